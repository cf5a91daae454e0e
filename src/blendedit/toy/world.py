"""Shapes World v1 (../shared/SHAPES_WORLD.md): scenes, rendering and captions.

A scene is described in units of the canvas side S (positions and radii in [0, 1]), so one scene
renders at any size. Rendering supersamples every edge (objects, stripes, checkers) for
anti-aliasing and is deterministic: the same scene gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

BACKGROUND_COLOURS = {
    "cream": (240, 234, 214),
    "light gray": (200, 200, 200),
    "gray": (128, 128, 128),
    "charcoal": (60, 60, 64),
    "tan": (196, 170, 130),
    "slate": (100, 110, 125),
}
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 35),
    "green": (40, 165, 70),
    "blue": (40, 90, 220),
    "purple": (145, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PATTERNS = ("plain", "gradient", "stripes", "checker", "noise")
PATTERN_WORDS = {
    "gradient": "gradient",
    "stripes": "striped",
    "checker": "checkered",
    "noise": "noisy",
}
R_MIN, R_MAX = 0.07, 0.20  # circumradius, x S
SMALL_BELOW, BIG_ABOVE = 0.11, 0.16
SHADOW_OFFSET, SHADOW_SIGMA, SHADOW_DARKEN = 0.02, 0.015, 0.35
STAR_INNER = 0.45


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, centre (cx, cy) and circumradius r in units of S, rotation in
    radians (ignored for circles)."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    rotation: float = 0.0

    @property
    def size_word(self) -> str | None:
        return "small" if self.r < SMALL_BELOW else "big" if self.r > BIG_ABOVE else None


@dataclass(frozen=True)
class Background:
    """pattern in PATTERNS; colours: one name (plain) or two; ``angle`` (radians), ``period`` /
    ``cell`` (x S) and ``seed`` (noise) as the pattern needs."""

    pattern: str
    colours: tuple[str, ...]
    angle: float = 0.0
    period: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def with_objects(self, objects) -> Scene:
        return replace(self, objects=tuple(objects))


# --- geometry --------------------------------------------------------------------------------


def convex_parts(obj: Obj) -> list[np.ndarray]:
    """The shape as a union of convex polygons (k, 2) in units of S, counter-clockwise; a circle
    returns [] (it is tested by distance)."""
    if obj.shape == "circle":
        return []
    r, a0 = obj.r, obj.rotation

    def ring(n: int, radius: float, phase: float) -> np.ndarray:
        ang = a0 + phase + 2 * math.pi * np.arange(n) / n
        return np.stack([obj.cx + radius * np.cos(ang), obj.cy + radius * np.sin(ang)], 1)

    if obj.shape == "square":
        return [ring(4, r, math.pi / 4)]
    if obj.shape == "triangle":
        return [ring(3, r, -math.pi / 2)]
    if obj.shape == "star":
        outer = ring(5, r, -math.pi / 2)
        inner = ring(5, r * STAR_INNER, -math.pi / 2 + math.pi / 5)
        points = [np.stack([inner[i - 1], outer[i], inner[i]]) for i in range(5)]
        return [inner] + points
    if obj.shape == "cross":
        half = 3 * r / math.sqrt(10)  # the arm corners lie on the circumcircle
        w = half / 3  # arm width 1/3 of the span
        c, s = math.cos(a0), math.sin(a0)
        rot = np.array([[c, -s], [s, c]])
        arms = [
            np.array([[-half, -w], [half, -w], [half, w], [-half, w]]),
            np.array([[-w, -half], [w, -half], [w, half], [-w, half]]),
        ]
        return [a @ rot.T + [obj.cx, obj.cy] for a in arms]
    raise ValueError(f"shape: expected one of {SHAPES}, got {obj.shape!r}")


def _inside_convex(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = np.ones(x.shape, bool)
    n = len(poly)
    # orientation-independent: all cross products share the polygon's sign
    (ax, ay), (bx, by) = poly[1] - poly[0], poly[2] - poly[1]
    sign = np.sign(ax * by - ay * bx)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        inside &= sign * ((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) >= 0
    return inside


def coverage(obj: Obj, size: int, ss: int = 4, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage (size, size) in [0, 1] of ``obj`` shifted by (dx, dy) x S."""
    out = np.zeros((size, size), np.float32)
    o = replace(obj, cx=obj.cx + dx, cy=obj.cy + dy)
    x0, x1 = max(0, int((o.cx - o.r) * size) - 1), min(size, int((o.cx + o.r) * size) + 2)
    y0, y1 = max(0, int((o.cy - o.r) * size) - 1), min(size, int((o.cy + o.r) * size) + 2)
    if x0 >= x1 or y0 >= y1:
        return out
    xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / (size * ss)
    ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / (size * ss)
    X, Y = np.meshgrid(xs, ys)
    if o.shape == "circle":
        hit = (X - o.cx) ** 2 + (Y - o.cy) ** 2 <= o.r**2
    else:
        hit = np.zeros(X.shape, bool)
        for part in convex_parts(o):
            hit |= _inside_convex(part, X, Y)
    h, w = y1 - y0, x1 - x0
    out[y0:y1, x0:x1] = hit.reshape(h, ss, w, ss).mean(axis=(1, 3))
    return out


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (sigma in pixels), zero outside."""
    if sigma <= 0:
        return a
    rad = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, a)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, a)


# --- rendering ---------------------------------------------------------------------------------


def _grid(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size * ss) + 0.5) / (size * ss)
    return np.meshgrid(c, c)


def render_background(bg: Background, size: int, ss: int = 4) -> np.ndarray:
    """(size, size, 3) float32 in 0..255."""
    a = np.array(BACKGROUND_COLOURS[bg.colours[0]], np.float32)
    b = np.array(BACKGROUND_COLOURS[bg.colours[-1]], np.float32)
    if bg.pattern == "plain":
        return np.broadcast_to(a, (size, size, 3)).copy()
    if bg.pattern == "noise":
        t = _value_noise(size, bg.period, bg.seed)
    else:
        X, Y = _grid(size, ss)
        u = X * math.cos(bg.angle) + Y * math.sin(bg.angle)
        if bg.pattern == "gradient":
            lo = min(0.0, math.cos(bg.angle)) + min(0.0, math.sin(bg.angle))
            hi = max(0.0, math.cos(bg.angle)) + max(0.0, math.sin(bg.angle))
            t = (u - lo) / (hi - lo)
        elif bg.pattern == "stripes":
            t = (np.floor(u / (bg.period / 2)) % 2).astype(np.float32)
        elif bg.pattern == "checker":
            t = ((np.floor(X / bg.period) + np.floor(Y / bg.period)) % 2).astype(np.float32)
        else:
            raise ValueError(f"pattern: expected one of {PATTERNS}, got {bg.pattern!r}")
        t = t.reshape(size, ss, size, ss).mean(axis=(1, 3))
    return a * (1 - t[..., None]) + b * t[..., None]


def _value_noise(size: int, feature: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: random values on a lattice of spacing ``feature`` x S,
    smoothstep-interpolated."""
    rng = np.random.RandomState(seed)
    n = int(math.ceil(1 / feature)) + 2
    lattice = rng.rand(n, n).astype(np.float32)
    c = (np.arange(size) + 0.5) / size / feature
    i = np.floor(c).astype(int)
    f = c - i
    f = f * f * (3 - 2 * f)
    iy, ix = np.meshgrid(i, i, indexing="ij")
    fy, fx = np.meshgrid(f, f, indexing="ij")
    v00, v01 = lattice[iy, ix], lattice[iy, ix + 1]
    v10, v11 = lattice[iy + 1, ix], lattice[iy + 1, ix + 1]
    top, bottom = v00 * (1 - fx) + v01 * fx, v10 * (1 - fx) + v11 * fx
    v = top * (1 - fy) + bottom * fy
    return (v - v.min()) / max(1e-6, v.max() - v.min())


def render(scene: Scene, size: int, ss: int = 4) -> Image.Image:
    """Render ``scene`` at ``size`` x ``size`` pixels: background, drop shadows, objects."""
    img = render_background(scene.background, size, ss)
    if scene.objects:
        off = SHADOW_OFFSET
        shadow = np.zeros((size, size), np.float32)
        for o in scene.objects:
            shadow = np.maximum(shadow, coverage(o, size, ss, off, off))
        shadow = gaussian_blur(shadow, SHADOW_SIGMA * size)
        img = img * (1 - SHADOW_DARKEN * shadow[..., None])
        for o in scene.objects:  # objects cover shadows: a shadow is never drawn over an object
            cov = coverage(o, size, ss)[..., None]
            img = img * (1 - cov) + np.array(COLOURS[o.colour], np.float32) * cov
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


# --- sampling and captions ------------------------------------------------------------------


def sample_background(rng: np.random.RandomState) -> Background:
    names = list(BACKGROUND_COLOURS)
    pattern = PATTERNS[rng.randint(len(PATTERNS))]
    if pattern == "plain":
        return Background("plain", (names[rng.randint(len(names))],))
    a, b = rng.choice(len(names), 2, replace=False)
    cols = (names[a], names[b])
    if pattern == "gradient":
        return Background(pattern, cols, angle=float(rng.uniform(0, 2 * math.pi)))
    if pattern == "stripes":
        return Background(
            pattern,
            cols,
            angle=math.radians(45 * rng.randint(4)),
            period=float(rng.uniform(0.08, 0.16)),
        )
    if pattern == "checker":
        return Background(pattern, cols, period=float(rng.uniform(0.12, 0.20)))
    return Background("noise", cols, period=0.1, seed=int(rng.randint(2**31)))


def random_object(
    rng: np.random.RandomState, r_range=(R_MIN, R_MAX), shape=None, colour=None
) -> Obj:
    shape = shape or SHAPES[rng.randint(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.randint(len(COLOURS))]
    r = float(rng.uniform(*r_range))
    rot = 0.0 if shape == "circle" else float(rng.uniform(0, 2 * math.pi))
    return Obj(shape, colour, 0.5, 0.5, r, rot)


def place(rng: np.random.RandomState, obj: Obj, others, tries: int = 200) -> Obj | None:
    """Put ``obj`` wholly inside the canvas with its bounding circle clear of the others'
    (shadow included); None if no place was found."""
    pad = SHADOW_OFFSET * 1.5
    for _ in range(tries):
        cx, cy = rng.uniform(obj.r, 1 - obj.r - pad, size=2)
        if all(math.hypot(cx - o.cx, cy - o.cy) > obj.r + o.r + pad for o in others):
            return replace(obj, cx=float(cx), cy=float(cy))
    return None


def sample_scene(rng: np.random.RandomState, n_objects: int | None = None) -> Scene:
    """A random scene with ``n_objects`` (0 to 3, random if None) objects."""
    n = rng.randint(4) if n_objects is None else n_objects
    objects: list[Obj] = []
    for _ in range(n):
        o = place(rng, random_object(rng), objects)
        if o is not None:
            objects.append(o)
    return Scene(sample_background(rng), tuple(objects))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(obj: Obj, with_size: bool = True) -> str:
    """'a red circle', 'a big blue star', 'an orange cross'."""
    words = ([obj.size_word] if with_size and obj.size_word else []) + [obj.colour, obj.shape]
    text = " ".join(words)
    return f"{article(text)} {text}"


def background_phrase(bg: Background) -> str:
    word = bg.colours[0] if bg.pattern == "plain" else PATTERN_WORDS[bg.pattern]
    return f"on {article(word)} {word} background"


def caption(scene: Scene, rng: np.random.RandomState, name_small: bool = False) -> str:
    """A caption in one of the templates: all objects or (for multi-object scenes, half the
    time) just one, sizes sometimes, the background sometimes. Empty scenes name the
    background. ``name_small``: a small object is always called small (so that a caption without
    a size word means a medium or big object); the same random draws either way."""
    objs = list(scene.objects)
    if len(objs) > 1 and rng.rand() < 0.5:
        objs = [objs[rng.randint(len(objs))]]
    with_size = rng.rand() < 0.5
    parts = [describe(o, with_size or (name_small and o.size_word == "small")) for o in objs]
    text = " and ".join(parts)
    if not objs:
        return background_phrase(scene.background).removeprefix("on ")
    if rng.rand() < 0.3:
        text += " " + background_phrase(scene.background)
    return text
