"""`valise keygen`: create a member identity."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from valise import identity, keyfiles
from valise.errors import Error, UsageError
from valise.policy import records


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keygen", help="create a member identity (identity, encryption and TLS keys), or rotate one (--rotate)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="member_id", help="member id: 1-64 of A-Z a-z 0-9 . _ -")
    which.add_argument(
        "--rotate", type=Path, metavar="OLD_DIR",
        help="new identity, encryption and TLS keys for the member whose identity is in OLD_DIR (same id; the "
        "replaced encryption keys are kept, to open what was sealed to them), and ID.rekey, the request its "
        "broker's operator appends with valise broker member rekey",
    )  # fmt: skip
    p.add_argument("--origin", help="with --rotate: the broker's log origin (binds the hand-over to that log)")
    p.add_argument(
        "--keep-encryption-key", action="store_true",
        help="with --rotate: keep the encryption key (a routine rotation of the identity key, not a compromise)",
    )  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="directory for the key files")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private keys with the passphrase in $VAR")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(handler=keygen)


def keygen(args: argparse.Namespace) -> int:
    if args.rotate is not None:
        return rotate(args)
    if args.keep_encryption_key or args.origin:
        raise UsageError("--origin and --keep-encryption-key go with --rotate")
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


def rotate(args: argparse.Namespace) -> int:
    """`keygen --rotate OLD_DIR --origin ORIGIN --out NEW_DIR`: the old key signs the hand-over; nothing changes
    for the broker until its operator appends the request, and the node uses the new keys once pointed at them
    (valise node move --identity NEW_DIR)."""
    if not args.origin:
        raise UsageError("--rotate needs --origin: the broker's log origin (valise broker info shows it)")
    if args.out.resolve() == args.rotate.resolve():
        raise UsageError("--out must be a new directory: the old keys stay until the broker has the new ones")
    passphrase = keyfiles.passphrase_from_env(args.passphrase_env)
    old = keyfiles.load_identity(args.rotate, passphrase)
    new = identity.rotate(old, os.urandom, int(time.time()), new_encryption_key=not args.keep_encryption_key)
    pub = keyfiles.save_identity(args.out, new, passphrase)
    request = args.out / f"{new.member_id}.rekey"
    keyfiles.write_public(request, records.rekey_request(old.signing, new.member_id, args.origin, new.bundle.raw))
    facts = {
        "id": new.member_id, "bundle": str(pub), "request": str(request), "sign_key": new.bundle.sign_key.hex(),
        "enc_key": new.bundle.enc_key.hex(), "encryption_keys_kept": len(new.enc_previous),
    }  # fmt: skip
    if args.json:
        print(json.dumps(facts))
    else:
        if args.keep_encryption_key:
            print(f"new identity and TLS keys for {new.member_id} in {args.out} (same encryption key)")
        else:
            kept = len(new.enc_previous)
            print(f"new identity, encryption and TLS keys for {new.member_id} in {args.out}; the replaced "
                  f"encryption keys are kept there ({kept}), to open what was sealed to them")  # fmt: skip
        print(f"  give the broker's operator {request}: valise broker member rekey --dir BROKER --request {request}")
        print(f"  once it is logged, point the node at the new keys: valise node move --dir NODE --identity {args.out}")
    return 0
