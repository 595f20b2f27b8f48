"""valise: a neutral-broker secure exchange for threat intelligence.

Signed, end-to-end encrypted packets relayed by a broker that enforces the members' own signed sharing
agreements and keeps a witnessed Merkle audit log. See specs/ for the formats.
"""

__version__ = "0.1.0"
