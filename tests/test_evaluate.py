"""evaluate.py as a user runs it on the tiny model, its pieces, and train.py's metrics log."""
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from conftest import DATA, run_main, write_stories
from model import StoryModel
from test_model import EOS_ID, tiny_config
from backbones import train_tokenizer
from checkpoint import load_model
from cli import UserError
from training import MetricsLog, metrics_path


def sample_stories(tmp_path, n_images):
    lines = [line for line in (DATA / "stories.txt").read_text().splitlines() if not line.startswith("#")]
    images = list(dict.fromkeys(line.split("\t")[0] for line in lines))[:n_images]
    return write_stories(tmp_path / "stories.txt", [line for line in lines if line.split("\t")[0] in images])


def test_evaluate_prints_the_table_writes_json_and_draws_pictures(tiny_checkpoint, tmp_path):
    stories = sample_stories(tmp_path, 8)  # 8 images, 2 reference stories each
    out, sheet, curves = tmp_path / "metrics.json", tmp_path / "sheet.png", tmp_path / "curves.png"
    result = run_main("evaluate.py", "--checkpoint", tiny_checkpoint, "--images", DATA / "images", "--stories", stories,
                      "--strategy", "sample", "--num-stories", "2", "--out", out, "--sheet", sheet, "--curves", curves,
                      "--clip", tmp_path / "no-clip-here", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "CIDEr-D" in result.stdout and "consistency recall@1" in result.stdout and "CLIPScore skipped" in result.stdout

    report = json.loads(out.read_text())
    m = report["metrics"]
    assert len(report["stories"]) == 8 and all(len(s) == 2 for s in report["stories"].values())
    assert m["perplexity"] == pytest.approx(math.exp(m["reference_loss"]))
    # The tiny model was trained on these images and stories: it must recognise them far above chance
    # (each image ranks its 2 stories among 2 + 14 others: chance recall@1 is about 1/15).
    assert m["consistency_candidates"] == 15 and m["consistency_recall_at_1"] >= 0.5
    assert m["bleu4"] > 20 and m["cider_d"] > 50 and 0 < m["rouge_l"] <= 100
    assert 0 < m["distinct_1_within_image"] <= 1 and 0 < m["distinct_2"] <= 1
    assert m["clip_score"] is None and any("CLIPScore skipped" in n for n in report["notes"])

    for path, size in ((sheet, (1200, None)), (curves, (800, 600))):
        image = Image.open(path)
        assert image.format == "PNG" and image.width == size[0] and (size[1] is None or image.height == size[1])
        assert np.asarray(image.convert("L"), dtype=float).std() > 10  # not a blank page
    assert Image.open(sheet).height > 2 * 250  # 2 rows of a thumbnail and its story


def test_curves_without_a_log_stop_before_any_work(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="metrics log not found"):
        evaluate.main(["--checkpoint", str(tiny_checkpoint), "--curves", str(tmp_path / "c.png"),
                       "--metrics-log", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("styles", [None, ["noir", "poetic"]])
def test_story_nll_is_the_training_loss_per_story(styles):
    torch.manual_seed(0)
    model = StoryModel(tiny_config(styles=styles or [])).eval()
    tokens = [torch.tensor(t) for t in ([5, 7, EOS_ID], [0, EOS_ID], [3, 4, 8, 9, EOS_ID])]
    features = torch.randn(3, 512)
    style_ids = torch.tensor([2, 0, 1]) if styles else torch.zeros(3, dtype=torch.long)
    nll, count = evaluate.story_nll(model, features, tokens, style_ids, batch_size=2, device="cpu", pad_id=EOS_ID)
    assert count.tolist() == [3, 2, 5]
    for i, t in enumerate(tokens):  # each story alone, through the model's own loss (a mean per token)
        loss = model(t[None], torch.ones(1, len(t), dtype=torch.long), features=features[i:i + 1],
                     style_ids=style_ids[i:i + 1] if styles else None).loss
        torch.testing.assert_close(nll[i] / count[i], loss)


def test_story_nll_of_albums_and_lengths_is_the_training_loss_per_story():
    """Albums of 1, 2 and 3 images padded in one batch, each story with its own length bucket: each
    story's loss is the one the model gives it alone, unpadded."""
    torch.manual_seed(0)
    model = StoryModel(tiny_config(album_slots=3, length_buckets=[2, 4])).eval()
    tokens = [torch.tensor(t) for t in ([5, 7, EOS_ID], [0, EOS_ID], [3, 4, 8, 9, EOS_ID], [6, EOS_ID])]
    albums = [torch.randn(n, 512) for n in (3, 1, 2, 2)]
    lengths = torch.tensor([1, 0, 2, 1])
    nll, count = evaluate.story_nll(model, albums, tokens, torch.zeros(4, dtype=torch.long), batch_size=3,
                                    device="cpu", pad_id=EOS_ID, lengths=lengths)
    for i, t in enumerate(tokens):
        loss = model(t[None], torch.ones(1, len(t), dtype=torch.long), features=albums[i][None],
                     length_ids=lengths[i:i + 1]).loss
        torch.testing.assert_close(nll[i] / count[i], loss)


def test_train_logs_every_step_and_each_validation_beside_the_checkpoint(tiny_checkpoint):
    records = [json.loads(line) for line in metrics_path(tiny_checkpoint).read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    vals = [r for r in records if "val_loss" in r]
    last_step = torch.load(tiny_checkpoint, weights_only=True)["train"]["step"]
    assert [r["step"] for r in steps] == list(range(1, last_step + 1))
    assert all(r["lr"] >= 0 and math.isfinite(r["train_loss"]) for r in steps)
    assert [r["epoch"] for r in vals] == list(range(1, vals[-1]["epoch"] + 1)) and vals[-1]["step"] == last_step
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]


def test_metrics_also_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    scalars = []

    class SummaryWriter:  # stands in for torch.utils.tensorboard's, which needs the tensorboard package
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    log = MetricsLog(tmp_path / "m.metrics.jsonl")
    log.write(3, epoch=1, train_loss=2.5, lr=0.1)
    log.close()
    assert scalars == [("train_loss", 2.5, 3), ("lr", 0.1, 3)]
    assert log.tensorboard.log_dir == tmp_path / "runs" / "m"
    assert json.loads((tmp_path / "m.metrics.jsonl").read_text())["train_loss"] == 2.5


def test_clip_score_with_local_weights_and_a_note_without(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    names = ["day_grass_house.jpg", "night_sea_boat.jpg"]
    stories = ["A red house on the grass.", "A boat on the sea at night."]
    tokenizer = train_tokenizer(stories * 3, vocab_size=300)
    config = CLIPConfig(projection_dim=16,
                        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")

    notes = []
    score = evaluate.clip_score(str(tmp_path / "clip"), DATA / "images", names, stories, 2, "cpu", notes)
    assert 0 <= score <= 2.5 and notes == []
    # An album's story is scored against each of its images; the album gets the mean.
    alone = [evaluate.clip_score(str(tmp_path / "clip"), DATA / "images", [n], stories[:1], 2, "cpu", notes) for n in names]
    album = evaluate.clip_score(str(tmp_path / "clip"), DATA / "images", ["|".join(names)], stories[:1], 2, "cpu", notes)
    assert album == pytest.approx(sum(alone) / 2) and notes[0].startswith("CLIPScore of an album: the mean")
    notes.clear()
    assert evaluate.clip_score(str(tmp_path / "none"), DATA / "images", names, stories, 2, "cpu", notes) is None
    assert "CLIPScore skipped" in notes[0]

    # A vision tower alone (what train.py --clip also takes) has no text tower to score with.
    from transformers import CLIPVisionModelWithProjection
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "vision")
    tokenizer.save_pretrained(tmp_path / "vision")
    CLIPImageProcessor().save_pretrained(tmp_path / "vision")
    assert evaluate.clip_score(str(tmp_path / "vision"), DATA / "images", names, stories, 2, "cpu", notes) is None
    assert notes[1].startswith("CLIPScore skipped: ") and "--clip DIR" in notes[1]


def test_fluency_prefers_the_stories_the_decoder_learned_to_their_words_shuffled(tiny_checkpoint):
    """The fluency score is the decoder's own perplexity without an image: text it learned scores far
    lower than the same words in a random order."""
    model, tokenizer = load_model(torch.load(tiny_checkpoint, weights_only=True))
    model.eval()
    stories = [line.split("\t")[1] for line in (DATA / "stories.txt").read_text().splitlines()
               if line and not line.startswith("#")][:8]
    rng = np.random.default_rng(0)
    shuffled = [" ".join(rng.permutation(story.split())) for story in stories]
    notes = []
    learned = evaluate.fluency(model, tokenizer, stories, 4, torch.device("cpu"), notes)
    assert learned < evaluate.fluency(model, tokenizer, shuffled, 4, torch.device("cpu"), notes) / 3
    assert 1 < learned and any("fine-tuned decoder" in n for n in notes)  # the tiny decoder trains
