"""`localchat models`: list the registry's models, download one from the Hub, remove one.

  models list             name, architecture, parameters, size on disk, downloaded or not, the default
  models download NAME    fetch a Hub model's files (only those it needs), with huggingface_hub's progress bars
  models remove NAME      delete its downloaded files and localchat's converted copy

The Hub is reached through huggingface_hub: HF_ENDPOINT, HF_TOKEN (gated repositories), HF_HUB_CACHE /
HF_HOME and HF_HUB_OFFLINE apply as they do for every other tool that uses it.
"""

from __future__ import annotations

import argparse
import json
import time

from localchat.cli.common import error


def add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list, download and remove models", description=__doc__.splitlines()[0])
    actions = p.add_subparsers(dest="models_command", metavar="{list,download,remove}", required=True)
    lister = actions.add_parser("list", help="the registry's models and which are downloaded")
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fetch = actions.add_parser("download", help="download a Hub model's files")
    fetch.add_argument("name", help="a name from `localchat models list`")
    drop = actions.add_parser("remove", help="delete a model's downloaded files and converted copy")
    drop.add_argument("name", help="a name from `localchat models list`")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    try:
        if args.models_command == "list":
            return _list(args.json)
        if args.models_command == "download":
            return _download(args.name)
        return _remove(args.name)
    except ValueError as exc:  # unknown model, bad registry, download refused: one line, no traceback
        return error(str(exc))
    except KeyboardInterrupt:
        return error("interrupted; run the same command again to resume (finished files are kept)")


def _list(as_json: bool) -> int:
    from localchat.model.catalog import catalog, human_bytes

    entries = catalog()
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    rows = [("NAME", "ARCHITECTURE", "PARAMS", "SIZE", "DOWNLOADED", "DEFAULT")]
    for e in entries:
        rows.append((e.name, e.architecture, e.parameters, human_bytes(e.size_bytes),
                     "yes" if e.downloaded else "no", "*" if e.default else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _download(name: str) -> int:
    from localchat.model import hub, resolve_model
    from localchat.model.catalog import human_bytes
    from localchat.model.files import is_available

    spec = resolve_model(name)
    if spec.source != "hub":
        if not is_available(spec):
            return error(f"model {spec.name!r} is not on this machine and is not a Hub model: {spec.install_hint}")
        print(f"{spec.name} is already on this machine ({spec.source}); nothing to download")
        return 0
    started = time.perf_counter()
    directory = hub.download(spec)  # huggingface_hub draws its progress bars on stderr
    print(f"{spec.name}: {human_bytes(hub.size_on_disk(spec))} in {directory} "
          f"({time.perf_counter() - started:.1f} s); run it with: localchat app --model {spec.name}")
    return 0


def _remove(name: str) -> int:
    from localchat.model import resolve_model
    from localchat.model.catalog import human_bytes, remove

    spec = resolve_model(name)
    freed, note = remove(spec)
    print(f"{spec.name}: freed {human_bytes(freed) if freed else 'nothing (no files of it were here)'}"
          + (f"; {note}" if note else ""))
    return 0
