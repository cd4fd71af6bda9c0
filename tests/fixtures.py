"""Tiny datasets written in the official file formats and layouts, for tests and benchmarks (no download).

Each writer puts its dataset under `root` exactly where `data.root=root` looks for it and returns the number of
images per split. Images carry a class-dependent colour so that a model can learn them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mtl_lightning.data.celeba import ATTRIBUTES
from mtl_lightning.data.domainnet import DOMAINS


def _images(rng, labels, shape):
    """uint8 noise plus a per-class brightness offset (so labels are learnable), shape (N, *shape)."""
    x = rng.integers(0, 128, size=(len(labels), *shape))
    return (x + 12 * (np.asarray(labels) % 10).reshape(-1, *[1] * len(shape))).astype(np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        y = rng.integers(0, 10, n)
        batch = {"batch_label": name, "labels": y.tolist(), "data": _images(rng, y, (3072,))}
        batch["filenames"] = [f"img_{i}.png" for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return {"train": 5 * per_batch, "test": test}


def write_stl10(root: Path, train: int = 30, test: int = 20, seed: int = 1) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        y = rng.integers(0, 10, n)
        x = _images(rng, y, (3, 96, 96)).transpose(0, 1, 3, 2)  # the official files are column-major
        np.ascontiguousarray(x).tofile(folder / f"{split}_X.bin")
        (y + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")  # labels 1..10
    return {"train": train, "test": test}


def write_svhn(root: Path, train: int = 40, test: int = 20, seed: int = 2) -> dict:
    from scipy.io import savemat

    rng, folder = np.random.default_rng(seed), Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        y = rng.integers(0, 10, n)
        x = _images(rng, y, (3, 32, 32)).transpose(2, 3, 1, 0)  # (32, 32, 3, N)
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)})
    return {"train": train, "test": test}


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.transpose(1, 2, 0)).save(path, quality=90)


def write_celeba(root: Path, sizes=(24, 8, 8), seed: int = 3, size=(218, 178), official: bool = False) -> dict:
    """torchvision's layout, or (`official`) the download's Img/, Anno/, Eval/ folders, as FAMO reads them."""
    rng, folder = np.random.default_rng(seed), Path(root) / "celeba"
    images, attr, part = ("Img/img_align_celeba", "Anno/", "Eval/") if official else ("img_align_celeba", "", "")
    n = sum(sizes)
    attrs = rng.integers(0, 2, (n, len(ATTRIBUTES)))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name, a in zip(names, attrs):
        _write_jpeg(folder / images / name, _images(rng, [a[:4] @ [8, 4, 2, 1]], (3, *size))[0])
    header = f"{n}\n" + " ".join(ATTRIBUTES) + " \n"
    lines = [f"{f} " + " ".join(f"{2 * v - 1:2d}" for v in a) for f, a in zip(names, attrs)]
    (folder / attr).mkdir(parents=True, exist_ok=True)
    (folder / f"{attr}list_attr_celeba.txt").write_text(header + "\n".join(lines) + "\n")
    split = np.repeat([0, 1, 2], sizes)
    (folder / part).mkdir(parents=True, exist_ok=True)
    (folder / f"{part}list_eval_partition.txt").write_text("".join(f"{f} {s}\n" for f, s in zip(names, split)))
    return dict(zip(("train", "val", "test"), sizes))


def write_office(root: Path, name: str = "office31", n=(6, 2, 2), seed: int = 8, lists_above: bool = False) -> dict:
    """LibMTL's Office layout: images under <root>/<office-31|office-home>/<domain>/<class>/<i>.jpg and the split
    lists data_txt/<name>/<domain>_{train,val,test}.txt (in the dataset's folder, or `lists_above` it), lines
    `relative/path.jpg label`; a domain's images show its class as their intensity."""
    from mtl_lightning.data.office import OFFICE

    folder_name, list_name, domains, classes = OFFICE[name]
    rng, folder = np.random.default_rng(seed), Path(root) / folder_name
    lists = (folder.parent if lists_above else folder) / "data_txt" / list_name
    lists.mkdir(parents=True, exist_ok=True)
    for d in domains:
        for split, count in zip(("train", "val", "test"), n):
            lines = []
            for i in range(count):
                label = int(rng.integers(0, 3)) * (classes // 3)
                rel = f"{d}/images/c{label:02d}/{split}_{i}.jpg"
                _write_jpeg(folder / rel, _images(rng, [label % 16], (3, 40, 48))[0])
                lines.append(f"{rel} {label}\n")
            (lists / f"{d}_{split}.txt").write_text("".join(lines))
    return {s: c * len(domains) for s, c in zip(("train", "val", "test"), n)}


QM9_SMILES = ["C", "N", "O", "C#C", "C#N", "C=O", "CO", "CC", "CN", "NC=O", "OC=O", "CCO", "CC#N", "CC=O", "C1CC1"]
QM9_HEADER = "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,u0_atom,u298_atom,h298_atom,g298_atom"


def qm9_property(i: int, j: int) -> float:
    """The fixture's value of property column j (0 = A ... 18 = g298_atom) of molecule i: known, distinct."""
    return round(0.5 + i + j / 100, 4)


def write_qm9(root: Path, repeat: int = 4, skip: tuple[int, ...] = (3,)) -> dict:
    """PyG's raw QM9 in its exact formats, from RDKit's embedding of a few small molecules: raw/gdb9.sdf (one
    molblock per molecule, named gdb_<i>), raw/gdb9.sdf.csv (the header, then mol_id and the 19 properties, in
    Hartree and friends: PyG converts), raw/uncharacterized.txt (9 header lines, the 1-based indices of molecules to
    skip, a footer line). Molecule i's property j is `qm9_property(i, j)`."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    raw = Path(root) / "qm9" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    writer = Chem.SDWriter(str(raw / "gdb9.sdf"))
    rows = [QM9_HEADER]
    smiles = QM9_SMILES * repeat
    for i, smi in enumerate(smiles):
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.EmbedMolecule(mol, randomSeed=i)
        mol.SetProp("_Name", f"gdb_{i + 1}")
        writer.write(mol)
        rows.append(f"gdb_{i + 1}," + ",".join(str(qm9_property(i, j)) for j in range(19)))
    writer.close()
    (raw / "gdb9.sdf.csv").write_text("\n".join(rows) + "\n")
    head = [f"header line {k}" for k in range(9)]
    body = [f"  {i + 1:6d}  gdb_{i + 1}  0.0  0.0" for i in skip]
    (raw / "uncharacterized.txt").write_text("\n".join([*head, *body, "footer"]) + "\n")
    return {"molecules": len(smiles) - len(skip)}


def write_domainnet(root: Path, domains=DOMAINS, train: int = 12, test: int = 8, seed: int = 4, size=64) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "domainnet"
    for k, d in enumerate(domains):
        for split, n in (("train", train), ("test", test)):
            y = rng.integers(0, 5, n) * 67  # a few of the 345 classes, spread over the range
            lines = []
            for i, label in enumerate(y):
                rel = f"{d}/class_{label:03d}/{d}_{label:03d}_{split}{i:06d}.jpg"
                _write_jpeg(folder / rel, _images(rng, [label // 67 + 4 * k], (3, size, size + 8 * k))[0])
                lines.append(f"{rel} {label}\n")
            (folder / f"{d}_{split}.txt").write_text("".join(lines))
    return {"train": train * len(domains), "test": test * len(domains)}


# Known values the dense fixtures encode, which the tests decode back.
DEPTH_M = 1.25  # every valid depth pixel, in metres (Taskonomy: 1.25 x 512 = 640 in 1/512 m units)
NORMAL = (0.0, 0.0, 1.0)  # NYUv2 fixtures: every valid normal points along the camera axis


def nyuv2_label(h=288, w=384) -> np.ndarray:
    """The fixtures' class map: 13 vertical stripes of classes 0..12, pixel (0, 0) unlabelled (-1)."""
    label = np.broadcast_to((np.arange(w) * 13 // w)[None], (h, w)).astype(np.float64).copy()
    label[0, 0] = -1
    return label


def write_nyuv2(root: Path, train: int = 5, val: int = 3, seed: int = 5) -> dict:
    """MTAN's preprocessed layout: {train,val}/{image,label,depth,normal}/<i>.npy at 288x384. Depth is DEPTH_M except
    pixel (0, 1) (0 = no measurement); normals are NORMAL except pixel (0, 2) (zero vector = none)."""
    rng, folder = np.random.default_rng(seed), Path(root) / "nyuv2"
    label = nyuv2_label()
    depth = np.full((288, 384, 1), DEPTH_M, dtype=np.float32)
    depth[0, 1] = 0
    normal = np.broadcast_to(np.asarray(NORMAL, dtype=np.float32), (288, 384, 3)).copy()
    normal[0, 2] = 0
    for split, n in (("train", train), ("val", val)):
        for kind in ("image", "label", "depth", "normal"):
            (folder / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.random((288, 384, 3)).astype(np.float32) * 0.5
            image[..., 0] += label / 24  # the class map shows in the red channel, so a model can learn it
            np.save(folder / split / "image" / f"{i}.npy", image)
            np.save(folder / split / "label" / f"{i}.npy", label)
            np.save(folder / split / "depth" / f"{i}.npy", depth)
            np.save(folder / split / "normal" / f"{i}.npy", normal)
    return {"train": train, "test": val}


def cityscapes_label(h=128, w=256, classes=7) -> np.ndarray:
    """Class c in the c-th band of columns, -1 in the first row (unlabelled)."""
    label = np.broadcast_to((np.arange(w) * classes // w).astype(np.float32), (h, w)).copy()
    label[0] = -1
    return label


def write_cityscapes(root: Path, train: int = 5, val: int = 3, seed: int = 6, label_folder: str = "label_7") -> dict:
    """MTAN's preprocessed layout: {train,val}/{image,label_7,label_19,depth}/<i>.npy at 128x256 (LibMTL's copy:
    `label_folder="label"`, 7 classes only). Inverse depth DEPTH_M except pixel (0, 1) (0 = invalid)."""
    rng, folder = np.random.default_rng(seed), Path(root) / "cityscapes"
    depth = np.full((128, 256, 1), DEPTH_M, dtype=np.float32)
    depth[0, 1] = 0
    labels = {label_folder: cityscapes_label()}
    if label_folder == "label_7":
        labels["label_19"] = cityscapes_label(classes=19)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            image = rng.random((128, 256, 3)).astype(np.float32) * 0.5
            image[..., 0] += labels[label_folder] / 14  # the class bands show in the red channel
            arrays = {"image": image, **labels, "depth": depth}
            for kind, a in arrays.items():
                (folder / split / kind).mkdir(parents=True, exist_ok=True)
                np.save(folder / split / kind / f"{i}.npy", a)
    return {"train": train, "test": val}


TASKONOMY_BUILDINGS = {"train": ["allensville", "beechwood"], "val": ["coffeen"], "test": ["darden"]}


def _png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def write_taskonomy(root: Path, views: int = 2, size: int = 32, seed: int = 6, layout: str = "standley") -> dict:
    """The per-building PNG layout with the split list, `layout` "standley" (<task>/<building>/, the list at the top)
    or "omnitools" (<task>/taskonomy/<building>/ beside a `replica` component, segment_semantic at half the image
    resolution, the list in splits_taskonomy/). Both decode to the same tensors. Known values: segment_semantic
    (i // 2 + j // 2) % 17 + 1 (constant on 2x2 blocks, so the half-size map upsamples to it exactly) with the block
    at (0, 0) = 0 (unlabelled); depth 640 (= DEPTH_M m) with pixel (0, 1) = 65535 (no geometry); normal RGB (0, 255,
    128); keypoints2d 150 and edge_texture 1788 (both 1.0 once standardised)."""
    rng, folder = np.random.default_rng(seed), Path(root) / "taskonomy"
    i, j = np.indices((size, size))
    seg = ((i // 2 + j // 2) % 17 + 1).astype(np.uint8)
    seg[:2, :2] = 0
    depth = np.full((size, size), round(DEPTH_M * 512), dtype=np.uint16)
    depth[0, 1] = 65535
    normal = np.zeros((size, size, 3), dtype=np.uint8)
    normal[..., 1], normal[..., 2] = 255, 128
    omni = layout == "omnitools"
    labels = {
        "segment_semantic": seg[::2, ::2] if omni else seg,
        "depth_zbuffer": depth,
        "normal": normal,
        "keypoints2d": np.full((size, size), 150, dtype=np.uint16),
        "edge_texture": np.full((size, size), 1788, dtype=np.uint16),
    }

    def where(task: str) -> Path:
        return folder / task / "taskonomy" if omni else folder / task

    rows = ["id,train,val,test"]
    for split_name, buildings in TASKONOMY_BUILDINGS.items():
        for b in buildings:
            rows.append(f"{b}," + ",".join("1" if s == split_name else "0" for s in ("train", "val", "test")))
            for v in range(views):
                stem = f"point_{v}_view_{v % 3}"
                rgb = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                rgb[..., 0] = seg * 12  # the classes show in the red channel
                _png(where("rgb") / b / f"{stem}_domain_rgb.png", rgb)
                for task, a in labels.items():
                    _png(where(task) / b / f"{stem}_domain_{task}.png", a)
    if omni:  # another component of the download, which the loader must ignore
        _png(folder / "rgb" / "replica" / "apartment_0" / "point_0_view_0_domain_rgb.png", rgb)
    lists = folder / "splits_taskonomy" if omni else folder
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train_val_test_tiny.csv").write_text("\n".join(rows) + "\n")
    n = {s: views * len(b) for s, b in TASKONOMY_BUILDINGS.items()}
    return n


def write_aliexpress(root: Path, countries=("NL",), train: int = 300, test: int = 100, seed: int = 7) -> dict:
    """MTReclib's layout: AliExpress_<CC>/{train,test}.csv with its header. Known values: categorical_j of row i is
    (i * j) % (10 + j) (country c adds c to field 1), numerical_j is i / 100 + j, click = (i % 3 == 0), conversion =
    click and (i % 6 == 0), so every value can be checked after parsing."""
    from mtl_lightning.data.aliexpress import CATEGORICAL, HEADER, NUMERICAL

    for c, cc in enumerate(countries):
        for split, n in (("train", train), ("test", test)):
            rows = [",".join(HEADER)]
            for i in range(n):
                cat = [(i * j) % (10 + j) + (c if j == 1 else 0) for j in range(1, CATEGORICAL + 1)]
                num = [f"{i / 100 + j:.4f}" for j in range(1, NUMERICAL + 1)]
                click, conv = int(i % 3 == 0), int(i % 6 == 0)
                rows.append(",".join(map(str, [1000 + i, *cat, *num, click, conv])))
            folder = Path(root) / f"AliExpress_{cc}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return {"train": train, "test": test}


WRITERS = {  # data.name -> writers of the files it reads
    "cifar10": [write_cifar10],
    "svhn": [write_svhn],
    "cifar_stl": [write_cifar10, write_stl10],
    "celeba": [write_celeba],
    "domainnet": [write_domainnet],
    "office31": [write_office],
    "officehome": [lambda root: write_office(root, "officehome", lists_above=True)],
}
# their own tests: tests/test_dense.py, tests/test_recsys.py, tests/test_graphs.py
DENSE_WRITERS = {"nyuv2": [write_nyuv2], "taskonomy": [write_taskonomy], "cityscapes": [write_cityscapes]}
TABULAR_WRITERS = {"aliexpress": [write_aliexpress]}
GRAPH_WRITERS = {"qm9": [write_qm9]}


# exp -> overrides that fit its tiny fixture and a CPU. The same family, smaller, where the paper's backbone would
# dominate the suite's CPU time (a dilated ResNet-50 at NYUv2's 288x384: ~30 s a step here); the config's other keys
# (output stride, optimiser, schedule) still apply.
# timm's test_resnet (0.4 M parameters, 96 channels at stride 32) where the configs name a ResNet-50/101: the step,
# the heads on its features and the checkpoints ~10x smaller than resnet10t's (nyuv2_forkmerge: 30 s -> 6 s)
LIGHTER = {exp: ["model.backbone=test_resnet"] for exp in ("nyuv2_mtl", "nyuv2_forkmerge")}
LIGHTER["nyuv2_forkmerge"] += ["weighting.pruning_epochs=1", "weighting.topk=[0,1]"]  # pruning runs, 1 epoch each
LIGHTER.update({exp: ["model.backbone=test_resnet"] for exp in ("nyuv2_deeplab", "cityscapes_deeplab")})
# undilated (stride 32: ~5x fewer FLOPs at NYUv2's size) where the dilated ResNet would dominate; cityscapes_deeplab
# keeps its config's output stride 8
LIGHTER["nyuv2_forkmerge"] += ["model.kwargs={output_stride: 32}"]
LIGHTER["nyuv2_mtl"] += ["model.kwargs={output_stride: 32}"]  # cityscapes_deeplab's 128x256 keeps stride 8
LIGHTER["nyuv2_deeplab"] += ["model.kwargs={output_stride: 32}"]
LIGHTER.update({exp: ["model.widths=[4,8,8,8,8]"] for exp in ("nyuv2_mtan", "cityscapes_mtan")})  # MTAN, narrow
LIGHTER["qm9_mtl"] = ["data.test_size=10", "data.val_size=10", "model.width=16"]  # the fixture's 59 molecules
LIGHTER["synthetic_graphs"] = ["data.size=64", "data.test_size=16", "data.val_size=16"]
# the fixtures hold tens of images: a validation hold-out and labels per class that fit them
LIGHTER["cifar10_ssl"] = ["data.val_count=20", "data.labels_per_class=2", "data.epoch_size=64"]
LIGHTER["svhn_ssl"] = ["data.val_count=2", "data.labels_per_class=1", "data.epoch_size=64"]
# one test batch of 8 images (a WRN-28-2 on the test split's seven views of each image, in batches of 512, was most of
# cifar10_ssl's run): every task reads the same images, so each batch holds them all (the other configs test their
# whole tiny split, where a bound would save little)
for exp in ("cifar10_ssl", "svhn_ssl", "digits_ssl"):
    LIGHTER[exp] = [*LIGHTER.get(exp, []), "data.eval_batch_size=8", "trainer.limit_test_batches=1"]
# a ViT-S of 2 blocks at width 64 for the ViT-S configs (the step, the checkpoints: ~10x smaller); embedded shapes
# at a few scenes (drawing 2,800 of them and testing on 400 cost more than the two steps)
LIGHTER.update({exp: ["model.depth=2", "model.width=64"] for exp in ("celeba_mtl", "taskonomy_mtl")})
LIGHTER["shapes_dense"] = ["data.train_size=64", "data.val_size=16", "data.test_size=16"]
# ForkMerge's checkpoints hold every branch and its optimiser state: writing them was most of these runs' time
LIGHTER["domainnet_forkmerge"] = ["model.backbone=test_resnet"]
# ForkMerge scores every candidate merge on the validation split: one batch each, as the split's other evaluations
for exp in ("digits_forkmerge", "nyuv2_forkmerge", "aliexpress_forkmerge", "domainnet_forkmerge"):
    LIGHTER[exp] = [*LIGHTER.get(exp, []), "weighting.val_batches=1"]
# Office's ResNet-18 at 32 px rather than 224 (the multi-input batches of every domain: 4x the images of a step), and
# timm's test_resnet (writing ResNet-18's checkpoints was most of the rest)
LIGHTER.update({exp: ["data.img_size=32", "model.backbone=test_resnet"] for exp in ("office31_mtl", "officehome_mtl")})


def stand_in_start(study_cfg, folder: Path) -> list[str]:
    """A study that starts from a trained run (`model.init` in its overrides, a run on the user's disk): the override
    naming an empty stand-in file in `folder`, which every check of the study accepts. No override otherwise."""
    if not any(o.startswith("model.init=") for o in study_cfg.overrides):
        return []
    (folder / "start.ckpt").touch()
    return [f"model.init={folder / 'start.ckpt'}"]
