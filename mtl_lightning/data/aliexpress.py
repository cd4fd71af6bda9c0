"""AliExpress (Tianchi dataset 74690): search logs of four countries with click and conversion labels, in the
processed layout of MTReclib (easezyc/Multitask-Recommendation-Library), which its users already have:

    <data.root>/AliExpress_<CC>/train.csv, test.csv      CC in NL, ES, FR, US
    header: search_id, categorical_1..16, numerical_1..63, click, conversion

MTReclib's loader drops `search_id`, reads the 16 categorical columns as integer ids and the 63 numerical ones as
float32; `conversion` is click-and-buy (the CTCVR label). Tasks: `ctr` (click) and `ctcvr` (conversion), over every
impression. Several countries are one mixture (`data.countries=[NL,ES]`), or, with `data.country_domains=true`,
domains: each country its own `ctr_<CC>` and `ctcvr_<CC>` heads, its samples labelled only on them (the -1 format).

Splits: the official files split by time; MTReclib has no validation split (it early-stops on test), so the last
`data.val_fraction` of each country's train.csv (the latest impressions) validates; no randomness is involved.
Field cardinalities: max id + 1 per field over the train and test files of the chosen countries (MTReclib takes
train's maximum, so a test id beyond it would index out of its embedding table).

Scale: each CSV is parsed once, in chunks, into memory-mapped .npy arrays under `<data.root>/.cache/aliexpress`
(or `data.cache_dir`), keyed by the file's path, size and modification time (a changed file is parsed again),
written to a temporary folder and renamed when complete. Batches are index gathers on those arrays; per row only
its labels and domain (3 bytes) and its row number (8) live in memory. Every value is checked while parsing: a
wrong header, a non-integer or negative id, a missing or non-numeric value, a label outside {0, 1} or a conversion
without a click stops with the file, line and column.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..console import say
from ..errors import MTLError
from ..tabular import Fields
from ..tasks import Binary
from .base import DATASETS, DataConfig, Split
from .files import RootedDataModule

COUNTRIES = ("NL", "ES", "FR", "US")
CATEGORICAL, NUMERICAL = 16, 63
HEADER = [
    "search_id",
    *(f"categorical_{i}" for i in range(1, CATEGORICAL + 1)),
    *(f"numerical_{i}" for i in range(1, NUMERICAL + 1)),
    "click",
    "conversion",
]
CHUNK = 200_000  # rows parsed at a time: ~130 MB of float64 at 82 columns


@dataclass
class AliExpressConfig(DataConfig):
    name: str = "aliexpress"
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))
    countries: list[str] = field(default_factory=lambda: ["NL"])
    country_domains: bool = False  # each country its own ctr/ctcvr heads, its samples labelled on them only
    val_fraction: float = 0.1  # the last part of each train.csv (by time) validates
    cache_dir: str | None = None  # default <data.root>/.cache
    batch_size: int = 2048
    eval_batch_size: int = 8192


class TabularParts(Dataset, Split):
    """Rows of several memory-mapped tables (one per country and file) as one split: labels (N, K) and domains (N,)
    in memory (int8), `rows` the global row of each sample across the parts."""

    def __init__(self, parts: list[dict[str, Tensor]], labels: Tensor, domains: Tensor, rows: Tensor):
        self.parts, self.labels, self.domains, self.rows = parts, labels, domains, rows
        sizes = torch.tensor([len(p["cat"]) for p in parts])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    def __len__(self) -> int:
        return len(self.labels)

    def _inputs(self, idx: Tensor) -> dict[str, Tensor]:
        rows = self.rows[idx]
        part = torch.searchsorted(self.offsets[1:], rows, right=True)
        first = self.parts[0]
        out = {k: torch.empty((len(rows), *v.shape[1:]), dtype=v.dtype) for k, v in first.items()}
        for p in part.unique().tolist():
            m = part == p
            local = rows[m] - self.offsets[p]
            for k, v in self.parts[p].items():
                out[k][m] = v[local]
        return out

    def __getitem__(self, i):
        idx = torch.as_tensor([i])
        return {k: v[0] for k, v in self._inputs(idx).items()}, self.labels[i].long()

    def __getitems__(self, idx: list[int]):
        idx = torch.as_tensor(idx)
        return self._inputs(idx), self.labels[idx].long()

    def take(self, rows: Tensor, labels: Tensor, domains: Tensor) -> TabularParts:
        return TabularParts(self.parts, labels, domains, self.rows[rows])


def _bad(path: Path, line: int, column: str, what: str) -> MTLError:
    return MTLError(
        f"{path}, line {line}, column {column!r}: {what}. AliExpress files in MTReclib's layout hold integer ids >= 0 "
        "in categorical_1..16, numbers in numerical_1..63, and 0/1 labels with conversion only after a click; fix or "
        "re-create the file (MTReclib's data/preprocess.py)."
    )


def _check_chunk(path: Path, chunk, first_line: int) -> np.ndarray:
    """The chunk as float64 (search_id dropped), or the first bad value named by file, line and column."""
    import pandas as pd

    values = chunk.iloc[:, 1:]
    for col in values.columns:
        if not pd.api.types.is_numeric_dtype(values[col]):  # text where a number belongs
            num = pd.to_numeric(values[col], errors="coerce")
            bad = int(np.flatnonzero(num.isna().to_numpy() & values[col].notna().to_numpy())[0])
            raise _bad(path, first_line + bad, col, f"{values[col].iloc[bad]!r} is not a number")
    a = values.to_numpy(np.float64)
    ids, labels = a[:, :CATEGORICAL], a[:, -2:]
    checks = [  # (cells, first column of those cells in `a`, what is wrong)
        (np.isnan(a), 0, "a value is missing"),
        ((ids < 0) | (ids != np.floor(ids)), 0, "not an integer id >= 0"),
        (~np.isin(labels, (0.0, 1.0)), a.shape[1] - 2, "a label must be 0 or 1"),
    ]
    for mask, first, what in checks:
        if mask.any():
            r, c = (int(v) for v in np.argwhere(mask)[0])
            raise _bad(path, first_line + r, HEADER[1 + first + c], f"{what} (got {float(a[r, first + c]):g})")
    orphan = np.flatnonzero((a[:, -1] == 1) & (a[:, -2] == 0))
    if len(orphan):
        raise _bad(path, first_line + int(orphan[0]), "conversion", "a conversion without a click")
    return a


def parse(path: Path, cache_root: Path) -> Path:
    """`path` parsed once into cat.npy (int32 ids), num.npy (float32) and labels.npy (int8) in a cache folder keyed
    by its path, size and modification time; the folder."""
    import pandas as pd

    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root / f"{path.parent.name}-{path.stem}-{key}"
    if (out / "meta.json").exists():
        return out
    with open(path) as f:
        header = f.readline().rstrip("\r\n").split(",")
        n = sum(1 for _ in f)
    if header != HEADER:
        where = next((i for i, (a, b) in enumerate(zip(header, HEADER)) if a != b), min(len(header), len(HEADER)))
        got = header[where] if where < len(header) else "(nothing)"
        want = HEADER[where] if where < len(HEADER) else "(nothing)"
        raise MTLError(
            f"{path} has {len(header)} columns where MTReclib's AliExpress layout has {len(HEADER)}, or other names: "
            f"column {where + 1} is {got!r}, expected {want!r} (search_id, categorical_1..16, numerical_1..63, click, "
            "conversion)."
        )
    say(f"parsing {path} ({n:,} rows) once into {out} (later runs memory-map it)")
    tmp = cache_root / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cat = np.lib.format.open_memmap(tmp / "cat.npy", "w+", np.int32, (n, CATEGORICAL))
        num = np.lib.format.open_memmap(tmp / "num.npy", "w+", np.float32, (n, NUMERICAL))
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.int8, (n, 2))
        i = 0
        for chunk in pd.read_csv(path, chunksize=CHUNK, low_memory=False):
            a = _check_chunk(path, chunk, first_line=i + 2)  # line 1 is the header
            if (a[:, :CATEGORICAL] > np.iinfo(np.int32).max).any():
                raise _bad(path, i + 2, "categorical", "an id beyond int32")
            cat[i : i + len(a)] = a[:, :CATEGORICAL]
            num[i : i + len(a)] = a[:, CATEGORICAL:-2]
            labels[i : i + len(a)] = a[:, -2:]
            i += len(a)
        maxima = cat.max(0).tolist() if n else [0] * CATEGORICAL
        for m in (cat, num, labels):
            m.flush()
        del cat, num, labels
        (tmp / "meta.json").write_text(json.dumps({"rows": n, "max_ids": maxima, "source": str(path)}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _open(folder: Path) -> tuple[dict[str, Tensor], Tensor, dict]:
    arrays = {k: torch.from_numpy(np.load(folder / f"{k}.npy", mmap_mode="c")) for k in ("cat", "num")}
    labels = torch.from_numpy(np.load(folder / "labels.npy", mmap_mode="c"))
    return arrays, labels, json.loads((folder / "meta.json").read_text())


@DATASETS.register("aliexpress")
class AliExpressDataModule(RootedDataModule):
    Config = AliExpressConfig
    img_size = 0
    source = (
        "Tianchi's AliExpress dataset (tianchi.aliyun.com/dataset/74690), processed as MTReclib does it "
        "(github.com/easezyc/Multitask-Recommendation-Library, data/preprocess.py, or its README's download) into "
        "AliExpress_<CC>/train.csv and test.csv"
    )

    def __init__(self, cfg: AliExpressConfig, seed: int = 0):
        bad = [c for c in cfg.countries if c not in COUNTRIES]
        if bad or not cfg.countries or len(set(cfg.countries)) != len(cfg.countries):
            raise MTLError(
                f"data.countries={list(cfg.countries)}: give distinct countries among {', '.join(COUNTRIES)}"
                + (f" (unknown: {', '.join(map(str, bad))})." if bad else ".")
            )
        if not 0 < cfg.val_fraction < 1:
            raise MTLError(
                f"data.val_fraction={cfg.val_fraction} must lie in (0, 1): the last part of train validates."
            )
        if cfg.country_domains and cfg.mixing == "sample":
            raise MTLError(
                "data.country_domains gives each country two heads (ctr, ctcvr); data.mixing=sample draws one domain "
                "per head. Use data.mixing=loss with country domains."
            )
        self.in_chans: Fields | None = None  # known once the files are parsed (setup), before the model is built
        super().__init__(cfg, seed)

    def describe(self) -> list[Binary]:
        if self.cfg.country_domains:
            return [Binary(f"{t}_{c}") for c in self.cfg.countries for t in ("ctr", "ctcvr")]
        return [Binary("ctr"), Binary("ctcvr")]

    @property
    def folder(self) -> Path:
        return Path(self.cfg.root).expanduser()

    def expected(self) -> list[str]:
        return [f"AliExpress_{c}/{s}.csv" for c in self.cfg.countries for s in ("train", "test")]

    def check(self) -> None:
        """The files are there; parse (or find in the cache) every one, so bad values and the field cardinalities
        are known before the model is built."""
        self.require()
        cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.folder / ".cache"
        self._parsed = {
            (c, s): parse(self.folder / f"AliExpress_{c}/{s}.csv", cache / "aliexpress") for c, s in self._files()
        }
        maxima = np.max([_open(f)[2]["max_ids"] for f in self._parsed.values()], axis=0)
        self.in_chans = Fields(tuple(int(m) + 1 for m in maxima), NUMERICAL)

    def _files(self):
        return [(c, s) for c in self.cfg.countries for s in ("train", "test")]

    def load(self) -> dict[str, TabularParts]:
        if self.in_chans is None:
            self.check()
        K, cd = len(self.all_tasks), self.cfg.country_domains
        parts, offset = [], 0
        labels, domains, rows = ({k: [] for k in ("train", "val", "test")} for _ in range(3))
        for c, s in self._files():
            arrays, y, meta = _open(self._parsed[(c, s)])
            parts.append(arrays)
            n = meta["rows"]
            full = torch.full((n, K), -1, dtype=torch.int8)
            col = 2 * self.cfg.countries.index(c) if cd else 0
            full[:, col : col + 2] = y
            dom = torch.full((n,), self.cfg.countries.index(c), dtype=torch.int8)
            g = torch.arange(offset, offset + n)
            if s == "train":  # the latest impressions of train validate
                cut = n - round(self.cfg.val_fraction * n)
                for split, sl in (("train", slice(0, cut)), ("val", slice(cut, n))):
                    labels[split].append(full[sl])
                    domains[split].append(dom[sl])
                    rows[split].append(g[sl])
            else:
                labels["test"].append(full)
                domains["test"].append(dom)
                rows["test"].append(g)
            offset += n
        return {
            k: TabularParts(parts, torch.cat(labels[k]), torch.cat(domains[k]), torch.cat(rows[k]))
            for k in ("train", "val", "test")
        }
