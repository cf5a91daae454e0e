"""Batch editing of a manifest: every row done exactly once, crash-safe, on Ray past one machine.

A manifest is JSONL (one object per line) or CSV (a header row), a row per edit:

- ``image`` (required), ``prompt`` (required), ``mask`` (a file; leave it out, or set
  ``mask_from_alpha`` true, to edit where the image is transparent) or ``mask_prompt`` (a text
  naming the region: the model finds it, and writes it beside the results); relative paths are
  relative to the manifest's folder;
- optional ``seed`` (else derived from the row's inputs, so it does not depend on row order),
  ``id`` (recorded in the summary), ``mask_threshold``, ``invert_mask``, ``resize_mask``, and any
  edit option (:class:`blendedit.LatentEditOptions` field; ``steps`` and ``n`` are short names).
  Unset values take the command line's.

Each row is keyed by a hash of its inputs (file contents, not names), prompt, seed, options and
model, and written to ``OUT/rows/<image stem>-<key>/`` exactly as ``blendedit edit`` writes (ranked
images, contact sheet, then the JSON sidecar last, every file through a temporary name). A row
counts as done when its sidecar and every file it lists exist; re-running the same command skips
those rows and redoes the others from a clean folder. A bad row is reported in the summary
(``OUT/summary.jsonl`` and ``OUT/summary.csv``, rewritten atomically after every row) and the
batch goes on.

Workers (Ray actors with ``--ray``) load the model once each; GPU workers take one GPU each, CPU
workers share the machine's cores. Past one machine, ``OUT`` and the inputs must be on storage
every node sees.
"""

from __future__ import annotations

import csv
import hashlib
import io as pyio
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .io import PROBE_PREFIX, check_output_folder, file_sha256, write_files_atomically
from .outputs import listed_files
from .runner import (
    EditRequest,
    LoadedModel,
    ModelSpec,
    edit_options,
    load_pipeline,
    option_from_text,
    options_class,
    run_edit,
)

ALIASES = {"steps": "num_inference_steps", "n": "num_images_per_prompt"}
REQUEST_FIELDS = ("mask_threshold", "invert_mask", "resize_mask", "max_pixels")
ROW_FIELDS = ("image", "prompt", "mask", "mask_from_alpha", "mask_prompt", "seed", "id", "lora")
SUMMARY_FIELDS = (
    "row",
    "id",
    "status",
    "key",
    "image",
    "mask",
    "prompt",
    "seed",
    "folder",
    "best",
    "best_score",
    "results",
    "seconds",
    "sample_seconds",
    "warnings",
    "error",
)


class ManifestError(ValueError):
    """The manifest itself cannot be read (not a row of it: those are reported per row)."""


@dataclass
class Row:
    """One manifest row, planned: its request (or the error that stops it) and where it goes."""

    row: int  # 1-based position among the manifest's rows
    raw: dict
    request: EditRequest | None = None
    key: str = ""
    folder: Path | None = None
    error: str | None = None
    loras: tuple = ()  # the row's own LoRAs (its `lora` column), on top of --lora's

    def entry(self, status: str, **kw) -> dict:
        """The row's summary entry."""
        r = self.request
        base = dict(
            row=self.row,
            id=self.raw.get("id"),
            status=status,
            key=self.key,
            image=str(r.image) if r else self.raw.get("image"),
            mask=_mask_said(r) if r else self.raw.get("mask"),
            prompt=r.prompt if r else self.raw.get("prompt"),
            seed=r.seed if r else self.raw.get("seed"),
            folder=str(self.folder) if self.folder else None,
            error=self.error,
        )
        return {f: (base | kw).get(f) for f in SUMMARY_FIELDS}


# --- the manifest -----------------------------------------------------------------------------


def _mask_said(r: EditRequest) -> str:
    if r.mask_prompt is not None:
        return f"found from words: {r.mask_prompt}"
    return str(r.mask) if r.mask else "alpha of image"


def read_manifest(path: str | Path) -> list[dict | str]:
    """Rows of a JSONL or CSV manifest; a line that is not a JSON object becomes an error
    string for that row (the others still run)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest: file not found: {str(path)!r}")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows: list[dict | str] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(obj if isinstance(obj, dict) else f"line {n}: not a JSON object")
            except json.JSONDecodeError as e:
                rows.append(f"line {n}: not valid JSON ({e.msg})")
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(pyio.StringIO(text))
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise ManifestError(f"manifest: {str(path)!r} needs a header row with an image column")
        return [{k: v for k, v in r.items() if k and v not in (None, "")} for r in reader]
    raise ManifestError(f"manifest: {str(path)!r} must be .jsonl or .csv")


def _coerce(name: str, value, default):
    """A CSV string (or JSON value) as the type of the option's default."""
    return option_from_text(name, value, default) if isinstance(value, str) else value


def _model_ident(spec: ModelSpec) -> str:
    """What of the model a row's key depends on: the model and the LoRAs and embeddings that
    --lora / --embedding put on it (by their files' hashes: another file, another output)."""
    from .lora import LoraSpec, parse_embedding, parse_lora

    loras = [parse_lora(t) if isinstance(t, str) else LoraSpec(*t) for t in spec.loras]
    embeddings = [parse_embedding(t) if isinstance(t, str) else t for t in spec.embeddings]
    parts = [f"{_file_ident(s.path)}:{s.scale}" for s in loras]
    parts += [f"{_file_ident(f)}:{t}" for f, t in embeddings]
    return "|".join([spec.model, *parts])


def _file_ident(path) -> str:
    """A file's SHA-256 (what its bytes are), or the text itself where it names no file (a hub
    id, or a file that is missing: the edit reports that)."""
    return file_sha256(path) if Path(path).is_file() else str(path)


def plan_row(
    raw: dict | str,
    row: int,
    base: Path,
    defaults: EditRequest,
    out: Path,
    model: str,
    method: str = "latent",
) -> Row:
    """Resolve a row against the command line's defaults; key it by what determines its
    output. Problems become the row's error (nothing raised)."""
    if isinstance(raw, str):
        return Row(row, {}, key=f"row{row}", error=f"manifest: {raw}")
    r = Row(row, raw)
    try:
        r.request = req = _request(raw, base, defaults, method)
        image_sha = file_sha256(req.image) if Path(req.image).is_file() else None
        mask_sha = (
            None
            if req.mask is None
            else (file_sha256(req.mask) if Path(req.mask).is_file() else None)
        )
        if req.seed is None:  # from the inputs: the same row gets the same seed in any order
            h = hashlib.sha256(f"{image_sha}|{mask_sha}|{req.prompt}".encode()).hexdigest()
            r.request = req = replace(req, seed=int(h[:8], 16))
        r.loras = _row_loras(raw.get("lora"), base)
        ident = dict(
            image=image_sha or str(req.image),
            mask=mask_sha or (str(req.mask) if req.mask else "alpha"),
            model=model,
            loras=[(_file_ident(s.path), s.scale) for s in r.loras],
            method=method,
            **{k: v for k, v in asdict(req).items() if k not in ("image", "mask")},
        )
        r.key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        r.folder = out / "rows" / f"{Path(req.image).stem}-{r.key}"
    except (ValueError, TypeError) as e:
        r.error = " ".join(str(e).split())
        r.key = r.key or hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    return r


def _row_loras(cell, base: Path) -> tuple:
    """A row's `lora` cell: "FILE[:SCALE]" or a list of them (files relative to the manifest's
    folder, as its images; hub ids as they are)."""
    from .lora import LoraSpec, parse_lora

    if cell in (None, ""):
        return ()
    cells = cell if isinstance(cell, list) else str(cell).split(";")
    specs = [parse_lora(str(c).strip()) for c in cells if str(c).strip()]
    return tuple(
        LoraSpec(str(base / s.path), s.scale) if (base / s.path).is_file() else s for s in specs
    )


def _request(raw: dict, base: Path, defaults: EditRequest, method: str) -> EditRequest:
    option_defaults = asdict(options_class(method)()) | defaults.options
    known = set(ROW_FIELDS) | set(REQUEST_FIELDS) | set(option_defaults) | set(ALIASES)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"options: unknown column(s) {', '.join(map(repr, unknown))}")
    for need in ("image", "prompt"):
        if not isinstance(raw.get(need), str) or not raw[need]:
            raise ValueError(f"{need}: missing (every row needs an image and a prompt)")
    options = dict(defaults.options)
    for k, v in raw.items():
        name = ALIASES.get(k, k)
        if name in option_defaults:
            options[name] = _coerce(name, v, option_defaults[name])
    mask_from_alpha = _coerce("mask_from_alpha", raw.get("mask_from_alpha", False), False)
    mask, mask_prompt = raw.get("mask"), raw.get("mask_prompt") or None
    if sum(map(bool, (mask_from_alpha, mask, mask_prompt))) > 1:
        raise ValueError("mask: give one of a mask file, mask_from_alpha and mask_prompt")
    if not (mask_from_alpha or mask or mask_prompt):
        raise ValueError(
            "mask: missing (give a mask file, a mask_prompt naming the region, or set "
            "mask_from_alpha to true)"
        )
    seed = raw.get("seed", defaults.seed)
    seed = None if seed is None else _coerce("seed", seed, 0)
    extra = {k: _coerce(k, raw[k], getattr(defaults, k)) for k in REQUEST_FIELDS if k in raw}
    return replace(
        defaults,
        image=str(base / raw["image"]),
        prompt=raw["prompt"],
        mask=str(base / mask) if mask else None,
        mask_prompt=None if mask_prompt is None else str(mask_prompt),
        seed=seed,
        options=asdict(edit_options(options, method)),  # all fields: the key sees every value
        **extra,
    )


# --- doing rows ---------------------------------------------------------------------------------


def finished(row: Row) -> dict | None:
    """The row's sidecar if the row is complete (the sidecar and every file it lists exist)."""
    if row.folder is None or row.request is None:
        return None
    sidecar = row.folder / f"{Path(row.request.image).stem}.json"
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return meta if all((row.folder / f).is_file() for f in listed_files(meta)) else None


def _entry_from_sidecar(row: Row, meta: dict, status: str, seconds: float | None) -> dict:
    res = meta["results"]
    return row.entry(
        status,
        best=str(row.folder / res[0]["file"]),
        best_score=res[0]["score"],
        results=len(res),
        seconds=round(seconds if seconds is not None else meta["wall_seconds"], 3),
        sample_seconds=meta["timings"].get("sample"),
        warnings="; ".join(meta.get("warnings", [])) or None,
    )


def do_row(loaded: LoadedModel, row: Row) -> dict:
    """Edit one row from a clean folder; its summary entry ('ok' or 'failed', never raises for
    a bad row)."""
    t0 = time.perf_counter()
    try:
        if row.folder.exists():  # an unfinished earlier attempt: start again from nothing
            shutil.rmtree(row.folder)
        from .lora import loras_for_a_while

        if row.loras and loaded.spec.method != "latent":
            raise ValueError("lora: the pixel method takes no LoRA")
        with loras_for_a_while(loaded.pipe, row.loras):
            _, meta = run_edit(
                loaded, row.request, row.folder, command="batch", warn=lambda w: None
            )
    except (ValueError, OSError) as e:
        row.error = " ".join(str(e).split())
        return row.entry("failed", seconds=round(time.perf_counter() - t0, 3))
    return _entry_from_sidecar(row, meta, "ok", time.perf_counter() - t0)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class BatchReport:
    entries: list[dict]
    wall_seconds: float
    workers: int
    ray: bool
    counts: dict = field(default_factory=dict)


def write_summary(out: Path, entries: list[dict]) -> None:
    """``summary.jsonl`` and ``summary.csv`` (one entry per row, in manifest order)."""
    entries = sorted(entries, key=lambda e: e["row"])
    jsonl = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    buf = pyio.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    w.writerows(entries)
    write_files_atomically(
        {out / "summary.jsonl": jsonl.encode(), out / "summary.csv": buf.getvalue().encode()}
    )


def run_batch(
    manifest: str | Path,
    out: str | Path,
    spec: ModelSpec,
    defaults: EditRequest,
    *,
    workers: int = 1,
    use_ray: bool = False,
    ray_address: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> BatchReport:
    """Run every unfinished row of ``manifest`` into ``out``; see the module's doc.

    ``threads``: torch threads per worker (default: the machine's cores / ``workers`` on Ray,
    torch's own choice in-process). CPU results are bit-identical across runs with the same
    threads per worker; float sums in another order may move a pixel by 1/255.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive integer, got {workers!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads: must be a positive integer, got {threads!r}")
    if workers > 1 and not use_ray:
        raise ValueError("workers: more than one worker runs on Ray; add --ray (use_ray=True)")
    out = check_output_folder(out)
    # what a kill cut short: a summary write, or a folder's write probe (a row's is in rows/, or
    # here before rows/ existed)
    for pattern in (".summary.*.tmp", f"{PROBE_PREFIX}*", f"rows/{PROBE_PREFIX}*"):
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    manifest = Path(manifest)
    raws = read_manifest(manifest)
    if not raws:
        raise ManifestError(f"manifest: {str(manifest)!r} has no rows")
    rows = [
        plan_row(r, i, manifest.parent, defaults, out, _model_ident(spec), spec.method)
        for i, r in enumerate(raws, 1)
    ]

    entries: dict[int, dict] = {}
    todo: list[Row] = []
    first_of: dict[str, int] = {}
    for r in rows:
        if r.error:
            entries[r.row] = r.entry("failed")
        elif r.key in first_of:
            entries[r.row] = r.entry("duplicate", error=f"same edit as row {first_of[r.key]}")
        else:
            first_of[r.key] = r.row
            meta = finished(r)
            if meta is not None:
                entries[r.row] = _entry_from_sidecar(r, meta, "skipped", None)
            else:
                todo.append(r)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, list(entries.values()))

    bar = tqdm(
        total=len(rows), initial=len(entries), disable=not progress, desc="batch", unit="row"
    )

    def record(entry: dict) -> None:
        entries[entry["row"]] = entry
        write_summary(out, list(entries.values()))
        failed = sum(e["status"] == "failed" for e in entries.values())
        bar.set_postfix(done=len(entries) - failed, failed=failed, refresh=False)
        bar.update(1)

    if todo:
        if use_ray:
            _run_on_ray(spec, todo, workers, ray_address, threads, record)
        else:
            if threads:
                import torch

                torch.set_num_threads(threads)
            loaded = load_pipeline(
                spec, num_images=defaults.options.get("num_images_per_prompt", 1)
            )
            for r in todo:
                record(do_row(loaded, r))
    bar.close()
    counts: dict[str, int] = {}
    for e in entries.values():
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    return BatchReport(
        [entries[k] for k in sorted(entries)],
        time.perf_counter() - t_start,
        workers,
        use_ray,
        counts,
    )


def _run_on_ray(
    spec: ModelSpec, todo: list[Row], workers: int, address: str | None, threads, record
):
    """Rows on a pool of Ray actors, each loading the model once."""
    import os

    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise ValueError(
            "ray: not installed; pip install 'blendedit[ray]' (or run without --ray)"
        ) from e
    import torch

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        gpu = (
            spec.device != "cpu"
            and (spec.device.startswith("cuda") or torch.cuda.is_available())
            and ray.cluster_resources().get("GPU", 0) >= 1
        )
        cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
        threads = threads or max(1, int(cpus // workers))
        options = dict(num_gpus=1, num_cpus=1) if gpu else dict(num_cpus=min(threads, cpus))
        Worker = ray.remote(**options)(_EditWorker)
        pool = ActorPool([Worker.remote(spec, threads) for _ in range(workers)])
        for entry in pool.map_unordered(lambda a, r: a.edit.remote(r), todo):
            record(entry)
    finally:
        if started:
            ray.shutdown()


class _EditWorker:
    """A Ray actor: loads the model once, then edits rows."""

    def __init__(self, spec: ModelSpec, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.loaded = load_pipeline(spec)

    def edit(self, row: Row) -> dict:
        return do_row(self.loaded, row)


def main_batch(args, spec: ModelSpec, defaults: EditRequest) -> int:
    """The `blendedit batch` command; exit code 0 when every row is done, 2 when any failed."""
    report = run_batch(
        args.manifest,
        args.out,
        spec,
        defaults,
        workers=args.workers,
        use_ray=args.ray,
        ray_address=args.ray_address,
        threads=args.threads,
        progress=not args.quiet,
    )
    c = report.counts
    print(
        f"blendedit batch: {len(report.entries)} rows: {c.get('ok', 0)} done now, "
        f"{c.get('skipped', 0)} already done, {c.get('duplicate', 0)} duplicates, "
        f"{c.get('failed', 0)} failed, in {report.wall_seconds:.1f} s; summary: "
        f"{Path(args.out) / 'summary.csv'}",
        file=sys.stderr,
    )
    for e in report.entries:
        if e["status"] == "failed":
            print(f"blendedit batch: row {e['row']} failed: {e['error']}", file=sys.stderr)
    return 2 if c.get("failed") else 0
