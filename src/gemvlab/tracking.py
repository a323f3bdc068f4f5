"""wandb behind one small interface, offline by default, so runs never need the network."""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemvlab.errors import GemvlabError

if TYPE_CHECKING:  # pandas costs half a second at every stage's start; only tables pass it
    import pandas as pd

log = logging.getLogger(__name__)

_ARTIFACT_NAME_MAX = 128  # wandb's limit; the server also wants [A-Za-z0-9._-] only


def artifact_name(name: str) -> str:
    """A wandb artifact name: characters other than letters, digits, '.', '_', '-' become '-'."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:_ARTIFACT_NAME_MAX]
    if not clean:
        raise GemvlabError(f"'{name}' has no character usable in a wandb artifact name "
                           "(letters, digits, '.', '_', '-')")
    return clean


def _wandb_server() -> str:
    """The server an online run talks to, as wandb settles it: WANDB_BASE_URL, the host given
    to `wandb login --host`, else its default."""
    import wandb

    return wandb.setup().settings.base_url


def _check_online(mode: str) -> None:
    """In logger.mode=online, refuse at once a wandb server that does not answer: wandb.init
    would wait a minute and a half, then end the run in a traceback."""
    from gemvlab.net import unreachable

    why = unreachable(_wandb_server()) if mode == "online" else None
    if why:
        raise GemvlabError(f"wandb cannot log online ({why}): pass logger.mode=offline (upload "
                           "later with `wandb sync`), or logger=none for no tracking")


class Tracker:
    """One wandb run per stage run; a no-op when logger.kind is none or mode is disabled."""

    def __init__(self, logger_cfg: Mapping[str, Any], *, name: str, group: str, job_type: str,
                 config: Mapping[str, Any]) -> None:
        self._run = None
        if logger_cfg.get("kind") != "wandb" or logger_cfg.get("mode") == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; tracking is off (logger=none silences this)")
            return
        _check_online(logger_cfg["mode"])
        run_dir = Path(logger_cfg["dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(project=logger_cfg.get("project", "gemvlab"),
                                   entity=logger_cfg.get("entity"), mode=logger_cfg["mode"],
                                   dir=str(run_dir), name=name, group=group,
                                   job_type=job_type, config=dict(config),
                                   reinit="finish_previous",
                                   settings=wandb.Settings(silent=True, console="off"))
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GemvlabError(f"wandb cannot start a run in logger.mode={logger_cfg['mode']} "
                               f"({first}): run `wandb login` or set WANDB_API_KEY, or pass "
                               "logger.mode=offline (logger=none for no tracking)") from exc

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(metrics))
            self._run.log(dict(metrics))

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        """One point of a curve (a training loss per step), not a summary value."""
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_artifact(self, name: str, type: str, files: Sequence[Path],
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Log files as one artifact; the name is made wandb-safe with artifact_name()."""
        if self._run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=artifact_name(name), type=type,
                                  metadata=dict(metadata) if metadata else None)
        for path in files:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact)

    def log_table(self, name: str, df: pd.DataFrame, files: list[Path]) -> None:
        if self._run is None:
            return
        import wandb

        self._run.log({name: wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})
        self.log_artifact(name, "table", files)

    def finish(self, failed: bool = False) -> None:
        """End the run and stop wandb's service process: run.finish alone can return before
        the service has written the run's file out (a read right after saw it empty under
        load), and a stage process tracks one run, so nothing is lost by stopping it."""
        if self._run is not None:
            import wandb

            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
            wandb.teardown()


# Reading offline runs back. wandb 0.31 writes each run as a .wandb file in the LevelDB log
# format (a 7-byte ":W&B" header, then 32 KiB blocks of records with a crc32, a length and a
# FULL/FIRST/MIDDLE/LAST type), each record a serialized wandb.proto.wandb_internal_pb2.Record.
# wandb-core (Go) reads them; the Python package no longer ships a reader (the old
# wandb.sdk.internal.datastore is gone), so the framing is decoded here.
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_file(path: Path) -> Path:
    if path.suffix == ".wandb":
        return path
    found = sorted(path.glob("*.wandb"))
    if len(found) != 1:
        raise GemvlabError(f"{path} holds {len(found)} .wandb files, not one: pass an "
                           "offline-run-* folder or its .wandb file")
    return found[0]


def _log_payloads(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file, reassembled; stops quietly at a half-written tail."""
    data = path.read_bytes()
    if len(data) < _HEADER or struct.unpack("<4sHB", data[:_HEADER]) != (b":W&B", 0xBEE1, 0):
        raise GemvlabError(f"{path} is not a wandb transaction log (version 0)")
    pos, pending = _HEADER, None
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's zero-filled trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if len(chunk) < length:
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise GemvlabError(f"{path}: a record at byte {pos} fails its checksum (corrupt)")
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            yield pending + chunk
            pending = None
        else:
            raise GemvlabError(f"{path}: unexpected record type {kind} at byte {pos}")


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    field = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if field is None or field == "none":
        return None
    value = getattr(item, field)
    return json.loads(value) if field == "json" else value


def _set(tree: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = _item_value(item)


def _remove(tree: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        tree = tree.get(key, {})
    tree.pop(keys[-1], None)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """What an offline run recorded, from its offline-run-* folder (or its .wandb file).

    Returns run_id, project, name, group, job_type, config, summary (nested dicts, as the
    run's summary ends), history (one dict per logged step), artifacts (name, type, digest,
    metadata, files) and exit_code (None while the run has not finished).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"run_id": None, "project": None, "name": None, "group": None,
                           "job_type": None, "config": {}, "summary": {}, "history": [],
                           "artifacts": [], "exit_code": None}
    for payload in _log_payloads(_wandb_file(Path(path))):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(run_id=run.run_id, project=run.project, name=run.display_name,
                       group=run.run_group, job_type=run.job_type)
            for item in run.config.update:
                _set(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set(out["config"], item)
            for item in record.config.remove:
                _remove(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _set(out["summary"], item)
            for item in record.summary.remove:
                _remove(out["summary"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            out["history"].append(row)
        elif kind == "artifact":
            art = record.artifact
            out["artifacts"].append({
                "name": art.name, "type": art.type, "digest": art.digest,
                "metadata": json.loads(art.metadata) if art.metadata else {},
                "files": [entry.path for entry in art.manifest.contents]})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["config"].pop("_wandb", None)
    return out
