"""What the operator and the proxy exchange, typed once: both import this package and
neither imports the other (DESIGN.md, "What a gateway sees").

- `labels`: the labels, annotations and names that tie runners, tables and AIModels;
- `price_table`: one row of the price table the operator writes and the proxy serves,
  written and read by one pair of functions; prices as the wire carries them;
- `demand`: the demand records in Redis the proxy writes and the operator scales by.
"""
