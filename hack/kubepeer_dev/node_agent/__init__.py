"""hack/node-agent: a kubelet stand-in for one node — DEV AND TEST ONLY.

Pods bound to its Node run as plain local processes (root, no cgroups, no image pulls,
no isolation beyond a network namespace per pod). Never run it on a machine that
serves anything else; see README "The node agent".
"""
