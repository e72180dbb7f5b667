"""Draws the sample scenes in data/images/ and writes their lines of data/stories.txt.

The sample data is synthetic so that it can ship with the repo under CC0: each scene
is a sky (day, sunset or night), a ground (grass, sea, snow or sand) and one object,
and each story names what the picture shows, so a model trained on it has to look.

    python data/make_samples.py          # rewrites data/images/ and data/stories.txt
"""
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent
W, H = 320, 240

SKIES = {
    "day": ((90, 160, 235), (200, 230, 255)),
    "sunset": ((250, 120, 60), (255, 210, 120)),
    "night": ((10, 15, 50), (40, 50, 110)),
}
GROUNDS = {
    "grass": (60, 150, 60),
    "sea": (30, 90, 170),
    "snow": (235, 240, 250),
    "sand": (225, 195, 130),
}
OPENINGS = {
    "day": ["On a bright morning", "Under a warm yellow sun", "One clear blue day"],
    "sunset": ["As the orange sunset faded", "In the red light of evening", "When the sky turned gold and pink"],
    "night": ["Under a silver moon", "On a quiet night full of stars", "Late at night, beneath the stars"],
}
PLACES = {
    "grass": ["on the green hill", "in a field of soft grass", "in the green meadow"],
    "sea": ["on the blue sea", "out on the rolling waves", "far out at sea"],
    "snow": ["in the white snow", "on the frozen snowy field", "where the snow lay deep"],
    "sand": ["on the golden sand", "on the warm beach", "by the sandy shore"],
}
THINGS = {
    "house": ("a little red house", ["The family inside lit the fire and told old stories.",
                                     "Its red door opened, and a girl ran out to play.",
                                     "Smoke curled from its chimney, and supper was almost ready."]),
    "tree": ("an old tree", ["Its branches whispered secrets to the wind.",
                             "A small bird built a nest in its highest branch.",
                             "Children carved their names into its bark long ago."]),
    "boat": ("a small white boat", ["The sailor sang as the sail filled with wind.",
                                    "It carried a letter to an island far away.",
                                    "A fisherman waited patiently for the first bite."]),
    "balloon": ("a bright yellow balloon", ["It drifted higher and higher, looking for adventure.",
                                            "A child had let it go, and now it was free.",
                                            "It floated over the world like a tiny second sun."]),
}


def gradient(top, bottom, height):
    img = Image.new("RGB", (W, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(height - 1, 1)
        draw.line([(0, y), (W, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def draw_scene(sky, ground, thing, rng):
    horizon = rng.randint(130, 160)
    img = Image.new("RGB", (W, H))
    img.paste(gradient(*SKIES[sky], horizon), (0, 0))
    draw = ImageDraw.Draw(img)
    base = GROUNDS[ground]
    for y in range(horizon, H):  # ground with a little texture so it is not flat colour
        jitter = rng.randint(-12, 12)
        draw.line([(0, y), (W, y)], fill=tuple(max(0, min(255, c + jitter)) for c in base))
    if sky == "day":
        x, y = rng.randint(30, W - 60), rng.randint(15, 50)
        draw.ellipse([x, y, x + 40, y + 40], fill=(255, 225, 60))
    elif sky == "sunset":
        x = rng.randint(40, W - 100)
        draw.ellipse([x, horizon - 30, x + 60, horizon + 30], fill=(255, 90, 40))
    else:
        for _ in range(40):
            sx, sy = rng.randint(0, W), rng.randint(0, horizon - 10)
            draw.point([(sx, sy), (sx + 1, sy)], fill=(255, 255, 230))
        x, y = rng.randint(30, W - 60), rng.randint(15, 50)
        draw.ellipse([x, y, x + 30, y + 30], fill=(230, 230, 210))
    cx = rng.randint(90, W - 90)
    if thing == "house":
        draw.rectangle([cx - 35, horizon - 20, cx + 35, horizon + 30], fill=(190, 40, 40))
        draw.polygon([(cx - 45, horizon - 20), (cx, horizon - 60), (cx + 45, horizon - 20)], fill=(90, 50, 30))
        draw.rectangle([cx - 8, horizon + 5, cx + 8, horizon + 30], fill=(70, 30, 20))
    elif thing == "tree":
        draw.rectangle([cx - 8, horizon - 30, cx + 8, horizon + 30], fill=(100, 60, 30))
        draw.ellipse([cx - 45, horizon - 110, cx + 45, horizon - 20], fill=(30, 110, 40))
    elif thing == "boat":
        draw.polygon([(cx - 50, horizon + 20), (cx + 50, horizon + 20), (cx + 35, horizon + 45), (cx - 35, horizon + 45)],
                     fill=(245, 245, 245))
        draw.line([(cx, horizon + 20), (cx, horizon - 50)], fill=(80, 60, 40), width=3)
        draw.polygon([(cx + 2, horizon - 50), (cx + 2, horizon + 15), (cx + 40, horizon + 15)], fill=(250, 250, 240))
    else:
        y = rng.randint(40, horizon - 70)
        draw.line([(cx, y + 55), (cx + 5, y + 110)], fill=(60, 60, 60), width=1)
        draw.ellipse([cx - 25, y, cx + 25, y + 58], fill=(250, 215, 30))
    return img.filter(ImageFilter.SMOOTH)


def story(sky, ground, thing, rng):
    name, endings = THINGS[thing]
    verb = "floated" if thing in ("boat", "balloon") else "stood"
    return f"{rng.choice(OPENINGS[sky])}, {name} {verb} {rng.choice(PLACES[ground])}. {rng.choice(endings)}"


def main():
    rng = random.Random(0)
    scenes = []
    for sky in SKIES:
        for ground in GROUNDS:
            for thing in THINGS:
                if (thing == "boat") != (ground == "sea") and thing != "balloon":
                    continue  # boats only on the sea, houses and trees only on land
                scenes.append((sky, ground, thing))
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    lines = ["# image_name<TAB>story; synthetic scenes drawn by data/make_samples.py (CC0)"]
    for sky, ground, thing in scenes:
        name = f"{sky}_{ground}_{thing}.jpg"
        draw_scene(sky, ground, thing, rng).save(images / name, quality=90)
        for _ in range(2):
            lines.append(f"{name}\t{story(sky, ground, thing, rng)}")
    # The real photos' lines (see data/README.md) are kept as they are, after the drawn scenes.
    stories = HERE / "stories.txt"
    old = stories.read_text(encoding="utf-8").splitlines() if stories.exists() else []
    photos = old[next((i for i, line in enumerate(old) if line.startswith("# real photos")), len(old)):]
    stories.write_text("\n".join(lines + photos) + "\n", encoding="utf-8")
    print(f"wrote {len(scenes)} images and {len(lines) - 1} stories to {HERE}; kept {len(photos)} lines of real photos")


if __name__ == "__main__":
    main()
