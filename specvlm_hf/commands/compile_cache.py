"""`specvlm compile-cache`: list, or prune, the fast path's compiled round functions kept on disk.

    specvlm compile-cache ~/.cache/specvlm/compile                  # what is there, and whether it can be used
    specvlm compile-cache ~/.cache/specvlm/compile --prune          # remove what this install cannot use
    specvlm compile-cache --prune --unused-days 30                  # ... and what no process loaded for 30 days

The folder is a `warmup(cache_dir=...)` / `--compile-cache` folder (its `rounds/` is read) or a store folder itself;
by default `$SPECVLM_COMPILE_CACHE`. Files written by other versions of torch, transformers, Python or specvlm-hf are
never loaded (they are compiled again), so pruning them loses nothing. Torch's own caches in the folder (`inductor/`,
the artifacts file) are left as they are.
"""

from __future__ import annotations

import os
import time


def register(subparsers):
    from .common import positive_float

    parser = subparsers.add_parser(
        "compile-cache",
        help="List or prune the fast path's compiled round functions kept on disk.",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "folder",
        nargs="?",
        default=None,
        help="A --compile-cache / warmup(cache_dir=...) folder, or its rounds/ folder "
        "(default: $SPECVLM_COMPILE_CACHE).",
    )
    parser.add_argument("--prune", action="store_true", help="Remove the files this installation cannot use.")
    parser.add_argument(
        "--unused-days",
        type=positive_float,
        default=None,
        help="With --prune, also remove files no process has loaded for this many days.",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="With --prune, list what would be removed, and remove nothing."
    )
    parser.set_defaults(func=_run)


def store_folder(folder: str | None) -> str:
    """The store folder `folder` names: its `rounds/` when it has one (a `cache_dir`), else itself."""
    from ..errors import UserError
    from ..precompile import ENVIRONMENT_VARIABLE

    folder = folder or os.environ.get(ENVIRONMENT_VARIABLE)
    if not folder:
        raise UserError(f"no folder given; pass the compile cache folder, or set ${ENVIRONMENT_VARIABLE}.")
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise UserError(
            f"{folder}: no such folder; pass the folder given to --compile-cache or warmup(cache_dir=...)."
        )
    rounds = os.path.join(folder, "rounds")
    return rounds if os.path.isdir(rounds) else folder


def _run(args):
    from ..errors import UserError
    from ..precompile import prune, stored_rounds

    if (args.unused_days is not None or args.dry_run) and not args.prune:
        raise UserError("--unused-days and --dry-run go with --prune; add --prune.")
    folder = store_folder(args.folder)
    if not args.prune:
        rounds = stored_rounds(folder)
        print(f"{folder}: {len(rounds)} compiled round functions, {sum(r.size_bytes for r in rounds) / 1e6:.1f} MB")
        for stored in rounds:
            used = time.strftime("%Y-%m-%d", time.gmtime(stored.last_used))
            state = "usable" if stored.usable else f"not usable: {stored.reason}"
            print(
                f"  {os.path.basename(stored.path)}  {stored.function}  {stored.model}  "
                f"{stored.size_bytes / 1e6:.1f} MB  last used {used}  {state}"
            )
        return 0
    removed = prune(folder, unused_days=args.unused_days, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    megabytes = sum(stored.size_bytes for stored in removed) / 1e6
    print(f"{folder}: {verb} {len(removed)} compiled round functions ({megabytes:.1f} MB)")
    for stored in removed:
        print(f"  {os.path.basename(stored.path)}  {stored.function}: {stored.reason}")
    return 0
