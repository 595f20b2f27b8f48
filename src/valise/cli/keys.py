"""`valise keygen`: create a member identity."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from valise import identity, keyfiles
from valise.errors import Error, UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="create a member identity (identity, encryption and TLS keys)")
    p.add_argument("--id", required=True, dest="member_id", help="member id: 1-64 of A-Z a-z 0-9 . _ -")
    p.add_argument("--out", required=True, type=Path, help="directory for the key files")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private keys with the passphrase in $VAR")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(handler=keygen)


def keygen(args: argparse.Namespace) -> int:
    try:
        identity.check_member_id(args.member_id)
    except Error as exc:  # a usage mistake (exit 2), like any other bad argument
        raise UsageError(exc.what, hint=exc.hint) from None
    passphrase = keyfiles.passphrase_from_env(args.passphrase_env)
    ident = identity.generate(args.member_id, os.urandom, int(time.time()))
    pub = keyfiles.save_identity(args.out, ident, passphrase)
    if args.json:
        print(
            json.dumps(
                {
                    "id": ident.member_id,
                    "bundle": str(pub),
                    "sign_key": ident.bundle.sign_key.hex(),
                    "encrypted": passphrase is not None,
                }
            )
        )
    else:
        print(f"created identity {ident.member_id} in {args.out}")
        print(f"  public bundle (give this to others): {pub}")
        print(f"  identity key: {ident.bundle.sign_key.hex()}")
    return 0
