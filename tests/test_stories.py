"""prepare.py stories with a tiny random chat model built here: batching does not change the stories,
a run cut short continues where it stopped, and stories that miss their caption are dropped and counted."""
import pytest
import torch

import prepare
from dataset import parse_stories
from cli import UserError

CAPTIONS = ["A brown dog runs on the beach.", "Two cats sleep on a red sofa.", "A man rides a bicycle in the rain.",
            "A bowl of soup on a wooden table.", "Boats in a harbour at sunset."]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    """A tiny random Llama and a byte-level BPE tokenizer with a chat template, as save_pretrained writes them."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("writer")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS * 3, vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>")  # no pad token
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("# image<TAB>caption\n" + "".join(f"img{i}.jpg\t{c}\n" for i, c in enumerate(CAPTIONS)))
    return path


def stories(writer, captions, out, *extra):
    prepare.main(["stories", "--captions", str(captions), "--writer", str(writer), "--out", str(out),
                  "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", *map(str, extra)])
    return out.read_text().splitlines()[1:]  # without the header


def test_batched_stories_equal_one_by_one(writer, captions, tmp_path):
    batched = stories(writer, captions, tmp_path / "batched.txt", "--batch-size", "4")
    single = stories(writer, captions, tmp_path / "single.txt", "--batch-size", "1")
    assert batched == single
    assert [line.split("\t")[-2] for line in batched] == [f"img{i}.jpg" for i in range(5)]  # one per caption, in order
    assert len({line.split("\t")[-1] for line in batched}) > 1  # the stories do depend on the caption


def test_a_run_cut_short_continues_where_it_stopped(writer, captions, tmp_path, capsys, monkeypatch):
    # The random writer names nothing: keep the stories of some captions, so that both kinds of line are resumed.
    monkeypatch.setattr(prepare, "mentions", lambda story, caption: "o" in caption.split()[1])
    whole = stories(writer, captions, tmp_path / "whole.txt", "--batch-size", "2")
    assert [line.startswith("#") for line in whole] == [False, True, True, False, True]
    out = tmp_path / "cut.txt"
    text = (tmp_path / "whole.txt").read_text()
    lines = text.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:7])  # header, two stories, and a third one cut mid-line by a kill
    capsys.readouterr()
    assert stories(writer, captions, out, "--batch-size", "2") == whole
    assert "writing stories for 3 captions" in capsys.readouterr().out  # the two finished ones were not redone
    assert out.read_text() == text
    assert stories(writer, captions, out) == whole
    assert "already holds the stories of all 5 captions; nothing to do" in capsys.readouterr().out


def test_stories_that_miss_their_caption_are_dropped_and_counted(writer, captions, tmp_path, capsys, monkeypatch):
    told = {c: s for c, s in zip(CAPTIONS, ["The dog barked at the waves.", "The kitten slept.",
                                            "He pedalled home through the rain.", "It was very nice.",
                                            "The boats rocked gently."])}
    monkeypatch.setattr(prepare, "generate_stories", lambda model, tok, batch, args: [told[c] for c in batch])
    stories(writer, captions, tmp_path / "s.txt", "--batch-size", "2")
    last = capsys.readouterr().out.splitlines()[-1]
    assert "3 new stories" in last and last.endswith("dropped 2 that named nothing in their caption")
    examples, problems = parse_stories(tmp_path / "s.txt")
    assert problems == []
    # "cats" -> the story's "kitten" is another word; "bowl of soup on a wooden table" -> "very nice" names none of it
    assert [(ex.image, ex.story) for ex in examples] == [("img0.jpg", "The dog barked at the waves."),
                                                         ("img2.jpg", "He pedalled home through the rain."),
                                                         ("img4.jpg", "The boats rocked gently.")]


def test_mentions_uses_content_words_and_plurals():
    assert prepare.mentions("Her puppy found two shells.", "A girl and a shell on the sand")
    assert not prepare.mentions("It was a lovely day.", "A girl and a shell on the sand")
    assert prepare.mentions("The dogs ran.", "A dog on the grass")
    assert prepare.mentions("Anything at all.", "It is on the top")  # no content word: nothing to check
    assert not prepare.mentions("", "It is on the top")


def test_bad_prompt_and_other_captions_stop_with_one_line(writer, captions, tmp_path):
    with pytest.raises(UserError, match=r"--prompt 'Tell a story\.': has no \{caption\}"):
        prepare.main(["stories", "--captions", str(captions), "--writer", str(writer), "--out", str(tmp_path / "o.txt"),
                      "--prompt", "Tell a story."])
    (tmp_path / "o.txt").write_text("# header\nother.jpg\tA story.\n")
    with pytest.raises(UserError, match=r"o.txt: its 1 stories are not those of the first 1 captions in .*captions.txt; "
                                        r"choose another --out"):
        prepare.main(["stories", "--captions", str(captions), "--writer", str(writer), "--out", str(tmp_path / "o.txt")])


def test_max_words_keeps_the_first_whole_sentences_and_checks_what_is_left(writer, captions, tmp_path, monkeypatch):
    told = {CAPTIONS[0]: "The dog ran. It chased the waves all day long. Then it slept.",  # the dog is in the first
            CAPTIONS[1]: "It was late and the house was quiet. Two cats slept on the sofa.",  # the cats only in the second
            CAPTIONS[2]: "A man who loved the rain rode his old bicycle through every puddle in town.",  # one long sentence
            CAPTIONS[3]: "Soup! \"Hot soup,\" said Mum. They ate.", CAPTIONS[4]: "Boats."}
    monkeypatch.setattr(prepare, "generate_stories", lambda model, tok, batch, args: [told[c] for c in batch])
    lines = stories(writer, captions, tmp_path / "s.txt", "--max-words", "8")
    assert [line.split("\t") for line in lines] == [
        ["img0.jpg", "The dog ran."],  # a second sentence would make 11 words
        ["# dropped", "img1.jpg", "It was late and the house was quiet."],  # names nothing of its caption once cut
        ["img2.jpg", told[CAPTIONS[2]]],  # a first sentence is kept whole, however long
        ["img3.jpg", "Soup! \"Hot soup,\" said Mum. They ate."],  # 6 words: all of it
        ["img4.jpg", "Boats."]]
    with pytest.raises(UserError, match="--max-words take a number >= 1"):
        stories(writer, captions, tmp_path / "t.txt", "--max-words", "0")
