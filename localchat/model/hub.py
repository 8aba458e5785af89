"""Hub models on this machine: what is downloaded, downloading (only the files a model needs), removing.

Files live in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub),
shared with every other tool that uses huggingface_hub. The environment is read at each call, not at
import, so HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE set by a caller (or a test) always apply.

A model that is already downloaded loads without any network call; `localchat models download` is
the one way to fetch or update it. huggingface_hub resumes a transfer cut mid-file with an HTTP Range
request; files finished before an interruption are kept and not fetched again.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localchat import settings
from localchat.model.registry import (
    ModelNotFoundError,
    ModelSpec,
    ModelUnavailableError,
)

# A safetensors checkpoint needs its config, weights and tokenizer (tokenizer.model only for
# sentencepiece models without tokenizer.json; harmless otherwise). Everything else a repository
# holds (consolidated.safetensors copies, GGUF/ONNX exports, README images) is never fetched.
SAFETENSORS_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
]
DISK_MARGIN_BYTES = 256 * 2**20  # keep this much free beyond the files themselves


class DownloadError(ModelUnavailableError):
    """A download that could not be done; the message says why and what to do."""


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return settings.env_flag("HF_HUB_OFFLINE", False) or settings.env_flag("LOCALCHAT_OFFLINE", False)


def token() -> str | None:
    """HF_TOKEN if set; None lets huggingface_hub use the token saved by `hf auth login`."""
    return os.environ.get("HF_TOKEN") or None


def allow_patterns(spec: ModelSpec) -> list[str]:
    return [spec.gguf_file] if spec.gguf_file else list(SAFETENSORS_FILES)


def _repo_dir(spec: ModelSpec) -> Path:
    return hub_cache_dir() / ("models--" + (spec.repo_id or "").replace("/", "--"))


def _revision(spec: ModelSpec) -> str:
    return spec.revision or "main"


def _snapshot_dir(spec: ModelSpec) -> Path | None:
    repo = _repo_dir(spec)
    revision = _revision(spec)
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        commit = revision
    else:
        try:
            commit = (repo / "refs" / revision).read_text().strip()
        except OSError:
            return None
    directory = repo / "snapshots" / commit
    return directory if directory.is_dir() else None


def complete(directory: Path, spec: ModelSpec) -> bool:
    """Whether a snapshot holds everything loading needs (a download may have stopped half way)."""
    if spec.gguf_file:
        return (directory / spec.gguf_file).is_file()
    if not (directory / "config.json").is_file():
        return False
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((directory / shard).is_file() for shard in shards)
    return (directory / "model.safetensors").is_file()


def local_snapshot(spec: ModelSpec) -> Path | None:
    """The complete downloaded snapshot of a Hub model, or None (no network involved)."""
    directory = _snapshot_dir(spec)
    return directory if directory is not None and complete(directory, spec) else None


def snapshot_files(directory: Path, spec: ModelSpec) -> list[Path]:
    from fnmatch import fnmatch

    patterns = allow_patterns(spec)
    return [p for p in directory.iterdir() if any(fnmatch(p.name, pattern) for pattern in patterns)]


def size_on_disk(spec: ModelSpec) -> int:
    """Bytes of this model's downloaded files (the blobs its snapshot links to)."""
    directory = _snapshot_dir(spec)
    if directory is None:
        return 0
    total = 0
    for link in snapshot_files(directory, spec):
        try:
            total += link.resolve().stat().st_size
        except OSError:
            pass
    return total


# ---- downloading -------------------------------------------------------------------------------


@dataclass
class DownloadPlan:
    files: list[str]
    bytes_to_fetch: int
    bytes_total: int


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return dict(repo_id=spec.repo_id, revision=_revision(spec), cache_dir=str(hub_cache_dir()),
                endpoint=endpoint(), token=token(), allow_patterns=allow_patterns(spec))


def explain(spec: ModelSpec, error: BaseException) -> DownloadError:
    """huggingface_hub's many exception types as one clear message that says what to do."""
    from huggingface_hub import errors

    while isinstance(error, errors.DryRunError) and error.__cause__ is not None:
        error = error.__cause__  # a dry run wraps the Hub's own answer (gated, not found, no network)
    repo = f"{spec.repo_id}" + (f" (revision {spec.revision})" if spec.revision else "")
    url = f"{endpoint()}/{spec.repo_id}"
    if isinstance(error, errors.GatedRepoError):
        why = (f"{repo} is a gated repository: accept its terms at {url} with your Hugging Face account, "
               "then set HF_TOKEN to a token of that account" + (" (HF_TOKEN is set but has no access)" if token() else ""))
    elif isinstance(error, errors.RepositoryNotFoundError):
        why = f"{repo} does not exist on {endpoint()} (or is private: set HF_TOKEN to a token that can read it)"
    elif isinstance(error, errors.RevisionNotFoundError):
        why = f"{spec.repo_id} has no revision {spec.revision!r}"
    elif isinstance(error, errors.EntryNotFoundError) and not isinstance(error, errors.LocalEntryNotFoundError):
        why = f"{repo} has no file {error}"
    elif isinstance(error, errors.OfflineModeIsEnabled) or (isinstance(error, errors.LocalEntryNotFoundError) and offline()):
        why = (f"HF_HUB_OFFLINE is set and {spec.name} is not downloaded; run `localchat models download {spec.name}` "
               "with network access first (or unset HF_HUB_OFFLINE)")
    elif _network_error(error):
        why = (f"could not reach {endpoint()} ({type(error).__name__}: {_first_line(error)}); check the network "
               f"connection (or HF_ENDPOINT) and try again")
    elif isinstance(error, errors.HfHubHTTPError):
        why = f"the Hub answered with an error for {repo}: {_first_line(error)}"
    else:
        why = f"{type(error).__name__}: {_first_line(error)}"
    return DownloadError(f"cannot download model {spec.name!r}: {why}")


def _network_error(error: BaseException) -> bool:
    """A failure to talk to the Hub at all (no route, DNS, refused, timed out, cut), not an answer from it."""
    from huggingface_hub import errors

    if isinstance(error, errors.HfHubHTTPError):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, errors.LocalEntryNotFoundError, errors.DryRunError)):
        return True
    return type(error).__module__.startswith(("httpx", "httpcore", "h11", "ssl", "socket"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def plan(spec: ModelSpec) -> DownloadPlan:
    """Ask the Hub which files the model needs and how many bytes are still to fetch (no download)."""
    import logging

    from huggingface_hub import snapshot_download

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its "no files matched" warning: we say it better below
    try:
        infos = snapshot_download(**_hub_kwargs(spec), dry_run=True, tqdm_class=_silent_tqdm())
    except Exception as error:  # noqa: BLE001 - every huggingface_hub failure becomes one clear message
        raise explain(spec, error) from error
    finally:
        hub_logger.setLevel(level)
    names = [info.filename for info in infos]
    if spec.gguf_file and spec.gguf_file not in names:
        raise DownloadError(f"cannot download model {spec.name!r}: {spec.repo_id} has no file {spec.gguf_file!r}")
    if not spec.gguf_file and not ({"config.json"} <= set(names) and any(n.endswith(".safetensors") for n in names)):
        raise DownloadError(
            f"cannot download model {spec.name!r}: {spec.repo_id} has no config.json with safetensors weights "
            f"(files found: {', '.join(sorted(names)) or 'none'}); for a GGUF repository set gguf_file in its entry"
        )
    fetch = sum(info.file_size or 0 for info in infos if info.will_download)
    return DownloadPlan(names, fetch, sum(info.file_size or 0 for info in infos))


def _silent_tqdm():
    """A progress bar that draws nothing (the dry run's bars would only be noise)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def check_disk_space(spec: ModelSpec, needed: int) -> None:
    directory = hub_cache_dir()
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN_BYTES > free:
        raise DownloadError(
            f"cannot download model {spec.name!r}: it needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
            f"is free in {directory}; free some space or point HF_HUB_CACHE at a larger disk"
        )


def download(spec: ModelSpec, tqdm_class: Any = None) -> Path:
    """Fetch the model's files (only those missing) into the Hub cache; returns the snapshot directory.

    `tqdm_class` receives huggingface_hub's progress (its bars by default: bytes, then files).
    """
    if spec.source != "hub":
        raise ModelNotFoundError(f"model {spec.name!r} is not a Hub model (source: {spec.source}); nothing to download")
    if offline():
        found = local_snapshot(spec)
        if found is None:
            raise DownloadError(
                f"cannot download model {spec.name!r}: HF_HUB_OFFLINE is set and it is not downloaded; "
                f"run `localchat models download {spec.name}` with network access first (or unset HF_HUB_OFFLINE)"
            )
        return found
    from huggingface_hub import snapshot_download

    needed = plan(spec)
    check_disk_space(spec, needed.bytes_to_fetch)
    try:
        directory = Path(snapshot_download(**_hub_kwargs(spec), tqdm_class=tqdm_class))
    except Exception as error:  # noqa: BLE001
        raise explain(spec, error) from error
    if not complete(directory, spec):
        raise DownloadError(f"the download of {spec.name!r} finished without all its files in {directory}; run it again")
    return directory


def ensure_local(spec: ModelSpec) -> Path:
    """The downloaded snapshot, downloading it first when it is missing (and the network is allowed)."""
    found = local_snapshot(spec)
    if found is not None:
        return found
    if offline():
        raise DownloadError(
            f"model {spec.name!r} ({spec.repo_id}) is not downloaded and HF_HUB_OFFLINE is set (offline mode); "
            f"run `localchat models download {spec.name}` with network access first"
        )
    return download(spec)


def remove(spec: ModelSpec) -> int:
    """Delete this model's files from the Hub cache; returns the bytes freed. Other models' files stay."""
    directory = _snapshot_dir(spec)
    if directory is None:
        return 0
    freed = 0
    for link in snapshot_files(directory, spec):
        blob = link.resolve()
        if blob != link and blob.is_file():
            freed += blob.stat().st_size
            blob.unlink()
        elif link.is_file():
            freed += link.stat().st_size
        link.unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()
    repo = _repo_dir(spec)
    snapshots = repo / "snapshots"
    if not snapshots.exists() or not any(snapshots.iterdir()):
        shutil.rmtree(repo, ignore_errors=True)  # nothing of this repository is left: drop refs and blobs too
    return freed


def progress_reporter(report: Any) -> Any:
    """A tqdm class for download(): draws nothing, calls report(done_bytes, total_bytes) as bytes arrive.

    snapshot_download sums every file's bytes into its "bytes" bars; those are the ones reported."""
    from tqdm.auto import tqdm

    class Reporter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            self._counts_bytes = kwargs.get("unit") == "B"
            super().__init__(*args, **kwargs)
            self.n = kwargs.get("initial", 0) or 0

        def update(self, n=1):
            self.n += n or 0
            if self._counts_bytes:
                report(int(self.n), int(self.total or 0))

    return Reporter
