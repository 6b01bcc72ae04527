"""What a go-livepeer gateway does with a GetOrchestrator reply, written from gateway-wire.md
1.4 and 1.5 (not from our discovery code): the filters a reply must pass to be used.

Every test that holds a discovery reply, in any mode (payments on or off, offchain
gateways), checks it with these, so a field a real gateway drops us for cannot come back.
"""

from __future__ import annotations

from kubepeer.livepeer import net_pb2

# gateway-wire 1.4: DefaultCapabilities() = 0-12, 14, 26; the AI gateway asks for them + cap.
GATEWAY_DEFAULT_CAPS = [*range(13), 14, 26]
# starter.go:parseOrchBlacklist splits the -orchBlocklist flag, default "", on commas: [""].
DEFAULT_BLOCKLIST = ("",)
MAX_TICKET_EV = 3 * 10**12  # the gateway's default -maxTicketEV, wei


def blocklisted(info: net_pb2.OrchestratorInfo, blocklist=DEFAULT_BLOCKLIST) -> bool:
    """discovery.go isBlacklisted: each entry against hex(info.Address), so an empty address
    matches the default list's one empty entry."""
    ours = info.address.hex()
    return any(entry.lower().removeprefix("0x") == ours for entry in blocklist)


def gateway_accepts(info: net_pb2.OrchestratorInfo, cap: int, model: str, min_version=None,
                    blocklist=DEFAULT_BLOCKLIST) -> bool:  # fmt: skip
    """discovery.go's filters (1.5): a transcoder URL, not blocklisted, and
    Capabilities.CompatibleWith (1.4) for an AI gateway asking for (cap, model)."""
    if not info.transcoder or blocklisted(info, blocklist):
        return False
    caps = info.capabilities
    if min_version is not None:
        if caps.version in ("", "undefined"):
            return False
        if tuple(map(int, caps.version.split("."))) < min_version:
            return False
    wanted = [*GATEWAY_DEFAULT_CAPS, cap]
    mandatory = {w * 64 + b for w, word in enumerate(caps.mandatories) for b in range(64)
                 if word >> b & 1}  # fmt: skip
    if not mandatory <= set(wanted):  # (b) a stock orchestrator sets none
        return False
    for bit in wanted:  # (d)
        word, offset = divmod(bit, 64)
        if word >= len(caps.bitstring) or not caps.bitstring[word] >> offset & 1:
            return False
    per = caps.constraints.per_capability
    return cap in per and model in per[cap].models  # (c), discovery asks warm=false


def selectable(info: net_pb2.OrchestratorInfo, *, has_sender: bool, l1_block: int = 0) -> str:
    """Why selectOrchestrator or the on-chain pool would drop a reply, or "" (1.5)."""
    if not info.HasField("auth_token"):
        return "no auth_token"
    if info.price_info.price_per_unit < 0 or info.price_info.pixels_per_unit <= 0:
        return f"bad price_info {info.price_info}"
    if not has_sender:
        return ""
    if len(info.address) != 20:
        return f"address is {len(info.address)} bytes"
    if not info.HasField("ticket_params"):
        return "no ticket_params"
    tp = info.ticket_params
    if int.from_bytes(tp.expiration_block, "big") - l1_block <= 1:
        return "ticket params expire within a block"
    face_value = int.from_bytes(tp.face_value, "big")
    ev = face_value * int.from_bytes(tp.win_prob, "big") // (2**256 - 1)
    if not ev < face_value or ev > MAX_TICKET_EV:
        return f"ticket EV {ev} against face value {face_value}"
    return ""
