"""A web page that writes stories about pictures, served on this machine and working offline.

    python app.py                                  # then open http://127.0.0.1:7860
    python app.py --checkpoint my_model.pt --port 8000
"""
import argparse
import sys
from pathlib import Path

import gradio as gr

import dataset
import generate
import quantize
import utils

SAMPLES = Path(__file__).resolve().parent / "data" / "images"
MAX_STORIES = 5
MIN_LENGTH = 8


def port_number(value):
    n = int(value)
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="vlm_model.pt", help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on; 0.0.0.0 opens the page to your network (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--device", type=utils.parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    generate.add_quantize_arg(p)
    p.add_argument("--max-image-pixels", type=generate.non_negative_int,
                   help="refuse larger uploads, a guard against decompression bombs; 0 = no limit (default: Pillow's, about 89 million)")
    return p.parse_args(argv)


class Storyteller:
    """The model, loaded once, and the page's Generate button."""

    def __init__(self, checkpoint, device="auto", quantize_method="none"):
        self.device = utils.pick_device(device)
        self.model, self.tokenizer = utils.load_model(utils.load_checkpoint(checkpoint), where=checkpoint)
        self.model.to(self.device).eval()
        if quantize_method != "none":
            self.model.decoder = quantize.quantize_decoder(self.model.decoder, quantize_method)
        self.styles = list(getattr(self.model.config, "styles", None) or [])  # checkpoints trained with styles
        self.room = generate.story_room(self.model)

    def stories(self, image, style=None, strategy=generate.DEFAULTS["strategy"],
                temperature=generate.DEFAULTS["temperature"], max_new_tokens=generate.DEFAULTS["max_new_tokens"],
                num_stories=1) -> list[str]:
        """Stories about one RGB PIL image, decoded as generate.py does with the same settings."""
        settings = argparse.Namespace(**{**generate.DEFAULTS, "strategy": strategy, "temperature": temperature,
                                         "num_stories": num_stories})
        gen_config = generate.generation_config(settings, self.tokenizer, min(max_new_tokens, self.room))
        style_arg = {"style": style} if style else {}  # only a model trained with styles takes one
        [(_, stories)] = generate.write_stories(self.model, self.tokenizer, [("image", image)], gen_config,
                                                1, **style_arg)
        return stories

    def on_generate(self, upload, style, strategy, temperature, max_new_tokens, num_stories) -> str:
        """The Generate button: gradio's record of the uploaded file ({"path", "orig_name", ...}) and
        the settings in, the stories as text out. A problem the user can fix becomes a message in
        the page (gr.Error), not a traceback."""
        if not upload:
            raise gr.Error("Upload an image, drop one here, or pick a sample first.", print_exception=False)
        if strategy == "greedy" and int(num_stories) > 1:
            raise gr.Error("Greedy decoding gives one story; choose sample or beam for several.", print_exception=False)
        name = upload.get("orig_name") or Path(upload["path"]).name
        try:
            image = dataset.load_image(upload["path"], self.model.config.resize_size)
        except Exception as err:  # Pillow raises many types for broken files; each gets one line
            raise gr.Error(dataset.describe_image_error(name, err), print_exception=False) from None
        try:
            stories = self.stories(image, style or None, strategy, float(temperature), int(max_new_tokens),
                                   int(num_stories))
        except utils.UserError as err:  # e.g. a style this model does not know
            raise gr.Error(str(err), print_exception=False) from None
        if len(stories) == 1:
            return stories[0]
        return "\n\n".join(f"{k}. {story}" for k, story in enumerate(stories, start=1))


def build_page(teller: Storyteller | None, problem: str | None = None) -> gr.Blocks:
    """The page; without a model it only says why (problem), so a browser user learns it too."""
    # analytics_enabled=False: no usage reports and no version check leave this machine.
    with gr.Blocks(title="image-to-story", analytics_enabled=False) as page:
        if teller is None:
            gr.Markdown(f"# image-to-story\n**The model could not be loaded:** {problem}")
            return page
        gr.Markdown("# image-to-story\nUpload or drop a picture (or pick a sample below), press **Generate**, "
                    "read its story.")
        d = generate.DEFAULTS
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"])
                gr.Examples(sorted(str(p) for p in SAMPLES.glob("*.jpg")), inputs=image, examples_per_page=12,
                            label="Sample images")
            with gr.Column():
                style = gr.Dropdown([("none", "")] + [(s, s) for s in teller.styles], value="", label="Style",
                                    visible=bool(teller.styles))
                strategy = gr.Radio(["sample", "beam", "greedy"], value=d["strategy"], label="Strategy",
                                    info="sample: varied; beam and greedy: the most likely words")
                temperature = gr.Slider(0.1, 2.0, value=d["temperature"], step=0.05, label="Temperature",
                                        info="sample only: higher is wilder")
                length = gr.Slider(MIN_LENGTH, teller.room, value=min(d["max_new_tokens"], teller.room), step=1,
                                   label="Length", info="most new tokens per story")
                count = gr.Slider(1, MAX_STORIES, value=1, step=1, label="Stories", info="sample or beam")
                button = gr.Button("Generate", variant="primary")
                output = gr.Textbox(label="Stories", lines=8, interactive=False, elem_id="stories")
        # preprocess=False: the handler gets the uploaded file unopened. gr.Image's own preprocessing
        # opens it with Pillow, and a file that is not an image would fail there with no clear message.
        button.click(teller.on_generate, [image, style, strategy, temperature, length, count], output,
                     preprocess=False)
    return page


def main(argv=None):
    args = parse_args(argv)
    dataset.set_max_image_pixels(args.max_image_pixels)
    try:
        teller, problem = Storyteller(args.checkpoint, args.device, args.quantize), None
    except utils.UserError as err:  # still serve the page: whoever opens it is told what is wrong
        teller, problem = None, str(err)
        print(f"error: {problem}", file=sys.stderr)
    page = build_page(teller, problem)
    try:
        # Gradio 6's default theme uses fonts shipped with gradio, so the page fetches nothing from the internet.
        page.launch(server_name=args.host, server_port=args.port, share=False, allowed_paths=[str(SAMPLES)])
    except OSError as err:
        reason = str(err).split(". ")[0]  # gradio's advice after the first sentence names its own parameters
        raise utils.UserError(f"cannot serve on {args.host}:{args.port} ({reason}); choose another --port") from None


if __name__ == "__main__":
    utils.run_cli(main)
