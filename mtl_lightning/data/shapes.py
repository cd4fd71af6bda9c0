"""The embedded dense default: procedurally rendered scenes with exact per-pixel labels, no download.

Each scene is a room corner seen by a pinhole camera (x right, y down, z forward; focal length = image size, so
about 53 degrees of view): a floor (y = floor height), a back wall (z = wall distance), and 1-3 spheres and 1-2
axis-aligned boxes resting on the floor. A ray per pixel finds the nearest surface, which gives exactly:
- `semantic`: the surface's class: 0 floor, 1 wall, 2 sphere, 3 box;
- `depth`: its z (the z-buffer depth, as NYUv2's and Taskonomy's depth_zbuffer), in scene units;
- `normal`: its unit surface normal in camera coordinates;
- `edges`: 1 on both sides of a boundary between two surfaces (occlusion and contact edges, 2 px wide), else 0.
The image is textured (checkerboards of random period on the floor, the wall and the boxes; plain colours on the
spheres), Lambert-shaded under a random light direction with an ambient term, with a little pixel noise, so that
colour alone does not give the class and the geometry has to be read from shading and layout.

Scenes are seeded by `data.split_seed` and split index, so train, val and test never share a scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MTLError
from ..tasks import Depth, Normal, Segmentation, Task
from .base import DATASETS
from .dense import DenseConfig, DenseDataModule, DenseTensors

CLASSES = ("floor", "wall", "sphere", "box")


@dataclass
class ShapesConfig(DenseConfig):
    name: str = "shapes"
    img_size: int = 32
    train_size: int = 2000
    val_size: int = 400
    test_size: int = 400
    batch_size: int = 32  # small batches: at this size the number of steps, not of samples, limits learning
    eval_batch_size: int = 256


@DATASETS.register("shapes")
class ShapesDataModule(DenseDataModule):
    Config = ShapesConfig

    def __init__(self, cfg: ShapesConfig, seed: int = 0):
        if cfg.img_size < 8:
            raise MTLError(f"data.img_size={cfg.img_size} must be at least 8 for data=shapes.")
        self.img_size = cfg.img_size
        super().__init__(cfg, seed)

    def describe(self) -> list[Task]:
        avg = self.cfg.metric_average
        return [
            Segmentation("semantic", len(CLASSES), avg),
            Depth("depth", avg),
            Normal("normal", avg),
            Segmentation("edges", 2, avg),
        ]

    def load(self) -> dict[str, DenseTensors]:
        sizes = {"train": self.cfg.train_size, "val": self.cfg.val_size, "test": self.cfg.test_size}
        out = {}
        for i, (split, n) in enumerate(sizes.items()):
            g = torch.Generator().manual_seed(self.cfg.split_seed * 1_000_003 + i)
            image, semantic, depth, normal, surfaces = render(n, self.img_size, g)
            out[split] = DenseTensors(image, [semantic, depth, normal, edges(surfaces)])
        return out


def _rays(size: int) -> Tensor:
    c = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / size  # focal length = size
    v, u = torch.meshgrid(c, c, indexing="ij")
    d = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)
    return d / d.norm(dim=1, keepdim=True)


def _hit_plane(d: Tensor, axis: int, value: float) -> Tensor:
    t = value / d[:, axis]
    return torch.where(t > 0, t, torch.inf)


def _hit_sphere(d: Tensor, c: Tensor, r: float) -> Tensor:
    b = d @ c  # rays from the origin: |t d - c|^2 = r^2
    disc = b * b - (c @ c - r * r)
    t = b - disc.clamp(min=0).sqrt()
    return torch.where((disc > 0) & (t > 0), t, torch.inf)


def _hit_box(d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test: the entry distance and the axis of the face entered."""
    inv = 1.0 / d
    t1, t2 = lo * inv, hi * inv
    near, far = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_in, axis = near.max(1)
    t_out = far.min(1).values
    return torch.where((t_in < t_out) & (t_in > 0), t_in, torch.inf), axis


def render(n: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """n scenes: images (n, 3, S, S) uint8, classes (n, S, S) long, depth (n, 1, S, S), normals (n, 3, S, S), and
    surfaces (n, S, S) long, which surface (floor, wall, each object) a pixel sees."""
    d = _rays(size)
    P = size * size

    def u(lo, hi, k=()):
        return lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    classes = torch.empty(n, size, size, dtype=torch.long)
    depth = torch.empty(n, 1, size, size)
    normals = torch.empty(n, 3, size, size)
    surfaces = torch.empty(n, size, size, dtype=torch.long)
    for i in range(n):
        floor_y, wall_z = float(u(0.8, 1.4)), float(u(6.0, 9.0))
        t = torch.stack([_hit_plane(d, 1, floor_y), _hit_plane(d, 2, wall_z)])  # (surfaces, P)
        cls, nrm = [0, 1], [torch.tensor([0.0, -1.0, 0.0]).expand(P, 3), torch.tensor([0.0, 0.0, -1.0]).expand(P, 3)]
        albedo = [u(0.3, 1.0, (3,)), u(0.3, 1.0, (3,))]
        period = [float(u(0.3, 1.0)), float(u(0.3, 1.0))]
        spheres = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            r = float(u(0.3, 0.8))
            c = torch.stack([u(-2.0, 2.0), torch.tensor(floor_y - r, dtype=torch.float64), u(2.5, 5.5)])
            spheres.append((c, r))
            t = torch.cat([t, _hit_sphere(d, c, r)[None]])
            cls.append(2)
            nrm.append(None)
            albedo.append(u(0.2, 1.0, (3,)))
            period.append(0.0)
        boxes = []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            half = torch.stack([u(0.2, 0.7), u(0.2, 0.7), u(0.2, 0.7)])
            c = torch.stack([u(-2.0, 2.0), floor_y - half[1], u(2.5, 5.5)])
            lo, hi = c - half, c + half
            tb, axis = _hit_box(d, lo, hi)
            face = torch.zeros(P, 3, dtype=torch.float64)
            face[torch.arange(P), axis] = -torch.sign(d[torch.arange(P), axis])  # the face turned to the camera
            boxes.append((lo, hi))
            t = torch.cat([t, tb[None]])
            cls.append(3)
            nrm.append(face)
            albedo.append(u(0.2, 1.0, (3,)))
            period.append(float(u(0.15, 0.4)))
        t_min, which = t.min(0)
        p = d * t_min[:, None]
        normal = torch.zeros(P, 3, dtype=torch.float64)
        colour = torch.zeros(P, 3, dtype=torch.float64)
        for s in range(len(cls)):
            m = which == s
            if not m.any():
                continue
            if cls[s] == 2:
                c, r = spheres[s - 2]
                normal[m] = (p[m] - c) / r
            else:
                normal[m] = nrm[s][m].to(normal)
            checker = 1.0
            if period[s] > 0:  # a checkerboard in world coordinates, on the surface's two free axes
                q = torch.floor(p[m] / period[s]).sum(1).remainder(2)
                checker = (0.6 + 0.4 * q)[:, None]
            colour[m] = albedo[s] * checker
        to_light = F.normalize(torch.stack([u(-1.0, 1.0), u(-1.5, -0.5), u(-1.0, -0.2)]), dim=0)  # above, in front
        shade = 0.25 + 0.75 * (normal @ to_light).clamp(min=0)
        img = colour * shade[:, None] + 0.02 * torch.randn(P, 3, generator=g, dtype=torch.float64)
        images[i] = (img.clamp(0, 1) * 255).round().to(torch.uint8).T.reshape(3, size, size)
        classes[i] = torch.as_tensor(cls)[which].reshape(size, size)
        depth[i, 0] = (t_min * d[:, 2]).reshape(size, size).float()
        normals[i] = normal.T.reshape(3, size, size).float()
        surfaces[i] = which.reshape(size, size)
    return images, classes, depth, normals, surfaces


def edges(surfaces: Tensor) -> Tensor:
    """(n, S, S) long: 1 on both sides of every boundary between surfaces (occlusion and contact edges, 2 px wide)."""
    out = torch.zeros_like(surfaces)
    for dim in (1, 2):
        n = surfaces.shape[dim] - 1
        step = surfaces.narrow(dim, 1, n) != surfaces.narrow(dim, 0, n)
        out.narrow(dim, 0, n)[step] = 1
        out.narrow(dim, 1, n)[step] = 1
    return out
