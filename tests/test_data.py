import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lsr.data import (
    DataConfig,
    cached_token_ids,
    calibration_windows,
    eval_windows,
    join_and_tokenize,
    load_texts,
)
from lsr.data.sources import embedded_wiki_articles

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights and activations to four bit integers.",
    "Rotations spread outliers across channels before rounding.",
    "Perplexity is the exponential of the mean negative log likelihood.",
] * 4


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, model_max_length=16, bos_token="<s>")


@pytest.fixture
def corpus(tmp_path):
    """A single text file of 60 distinct paragraphs."""
    paras = [f"Paragraph {i}: " + SENTENCES[i % 4] + f" Number {i * 7}." for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path, paras


# --- sources ---------------------------------------------------------------------------------------


def test_embedded_wiki_splits_disjoint_and_deterministic():
    train, evals = embedded_wiki_articles("train"), embedded_wiki_articles("eval")
    assert len(train) > 5000 and 300 < len(evals) < len(train) / 4
    assert not {t for t, _ in train} & {t for t, _ in evals}
    assert [t for t, _ in train] == sorted(t for t, _ in train)
    tr_texts, ev_texts = load_texts("embedded-wiki", "train"), load_texts("embedded-wiki", "eval")
    assert tr_texts == [x for _, x in train] and all(x.strip() for x in tr_texts + ev_texts)
    assert not set(tr_texts) & set(ev_texts)
    assert load_texts("embedded-wiki", "eval") == ev_texts


def test_single_file_is_split_by_paragraph(corpus):
    path, paras = corpus
    train, evals = load_texts(str(path), "train"), load_texts(f"text:{path}", "eval")
    assert train and evals and not set(train) & set(evals)
    assert sorted(train + evals) == sorted(paras)
    assert train == [p for p in paras if p in set(train)]  # file order kept
    assert load_texts(str(path), "train") == train


def test_directory_and_explicit_splits(tmp_path):
    (tmp_path / "train.txt").write_text("alpha beta\n\ngamma\n")
    (tmp_path / "test.txt").write_text("delta epsilon\n")
    assert load_texts(str(tmp_path), "train") == ["alpha beta\n\ngamma\n"]
    assert load_texts(str(tmp_path), "eval") == ["delta epsilon\n"]
    spec = f"train={tmp_path / 'test.txt'},eval={tmp_path / 'train.txt'}"
    assert load_texts(spec, "train") == ["delta epsilon\n"]
    assert load_texts(spec, "eval") == ["alpha beta\n\ngamma\n"]
    other = tmp_path / "plain"
    other.mkdir()
    (other / "a.txt").write_text("\n\n".join(f"doc a{i}" for i in range(30)))
    (other / "b.txt").write_text("\n\n".join(f"doc b{i}" for i in range(30)))
    both = load_texts(str(other), "train") + load_texts(str(other), "eval")
    assert sorted(both) == sorted([f"doc a{i}" for i in range(30)] + [f"doc b{i}" for i in range(30)])


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_texts(str(tmp_path / "nope.txt"), "train")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_texts(f"train={tmp_path / 'missing'},eval={tmp_path / 'missing'}", "eval")
    (tmp_path / "train.txt").write_text("only train\n")
    with pytest.raises(FileNotFoundError, match="eval"):
        load_texts(str(tmp_path), "eval")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_texts(f"train={empty},eval={empty}", "train")
    with pytest.raises(ValueError, match="accepted"):
        load_texts("no-such-corpus", "train")
    with pytest.raises(ValueError, match="split"):
        load_texts("embedded-wiki", "validation")


# --- windows ---------------------------------------------------------------------------------------


def test_join_and_tokenize_roundtrip(tok):
    texts = SENTENCES[:3]
    ids = join_and_tokenize(tok, texts)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tok.bos_token_id not in ids.tolist()  # no special tokens added
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "\n\n".join(texts)
    long_ids = join_and_tokenize(tok, SENTENCES)  # far beyond model_max_length=16: not truncated
    assert long_ids.numel() > 100


def test_eval_windows_exact_and_non_overlapping():
    ids = torch.arange(103)
    w = eval_windows(ids, 10)
    assert w.shape == (10, 10) and w.dtype == torch.long
    assert torch.equal(w.flatten(), ids[:100])
    assert eval_windows(ids, 10, max_windows=3).shape == (3, 10)
    assert eval_windows(ids, 10, max_windows=50).shape == (10, 10)
    with pytest.raises(ValueError, match="shorter"):
        eval_windows(ids, 104)
    with pytest.raises(ValueError):
        eval_windows(ids, 10, max_windows=0)


def test_calibration_windows_are_seeded_slices():
    ids = torch.arange(1000) * 3 + 5
    a = calibration_windows(ids, 16, 32, seed=0)
    assert a.shape == (16, 32)
    for row in a:
        start = (int(row[0]) - 5) // 3
        assert torch.equal(row, ids[start : start + 32])
    assert torch.equal(a, calibration_windows(ids, 16, 32, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 16, 32, seed=1))
    assert calibration_windows(ids[:32], 4, 32, seed=0).eq(ids[:32]).all()  # exactly one window fits
    with pytest.raises(ValueError, match="shorter"):
        calibration_windows(ids[:31], 4, 32, seed=0)


def test_cache_hit_and_corrupt_rebuild(tok, corpus, tmp_path, monkeypatch):
    path, _ = corpus
    cache = tmp_path / "cache"
    ids = cached_token_ids(tok, str(path), "train", cache)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    assert torch.equal(ids, join_and_tokenize(tok, load_texts(str(path), "train")))

    import lsr.data.windows as windows

    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(windows, "load_texts", boom)
    hit = cached_token_ids(tok, str(path), "train", cache)
    assert hit.dtype == torch.long and torch.equal(hit, ids)
    monkeypatch.undo()

    files[0].write_bytes(b"\x00garbage")
    assert torch.equal(cached_token_ids(tok, str(path), "train", cache), ids)
    monkeypatch.setattr(windows, "load_texts", boom)
    assert torch.equal(cached_token_ids(tok, str(path), "train", cache), ids)  # rebuilt file is valid
    # another split, or edited file content, gets its own cache entry
    monkeypatch.undo()
    cached_token_ids(tok, str(path), "eval", cache)
    assert len(list(cache.glob("*.safetensors"))) == 2
    path.write_text(path.read_text() + "\n\nA brand new closing paragraph.\n")
    cached_token_ids(tok, str(path), "train", cache)
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_cache_dir_env(tok, corpus, tmp_path, monkeypatch):
    path, _ = corpus
    monkeypatch.setenv("LSR_CACHE", str(tmp_path / "root"))
    cached_token_ids(tok, str(path), "eval")
    assert len(list((tmp_path / "root" / "tokens").glob("*.safetensors"))) == 1


# --- data config -----------------------------------------------------------------------------------


def test_data_config(tok, corpus, tmp_path):
    path, _ = corpus
    data = DataConfig(source=str(path), seq_len=8, num_calibration=5, max_eval_windows=3, batch_size=2,
                      cache_dir=str(tmp_path / "c"))
    calib = data.calibration_windows(tok)
    assert calib.shape == (5, 8) and calib.dtype == torch.long
    train = join_and_tokenize(tok, load_texts(str(path), "train"))
    assert torch.equal(calib, calibration_windows(train, 5, 8, seed=0))
    val = data.eval_windows(tok)
    stream = join_and_tokenize(tok, load_texts(str(path), "eval"))
    assert torch.equal(val, stream[:24].view(3, 8))
    assert torch.equal(DataConfig(source=str(path), seq_len=8, cache_dir=str(tmp_path / "c")).eval_windows(tok),
                       eval_windows(stream, 8))  # max_eval_windows None: all of them
    again = DataConfig(source=str(path), seq_len=8, num_calibration=5, cache_dir=str(tmp_path / "c"))
    assert torch.equal(again.calibration_windows(tok), calib)  # batch size and eval cap do not change them
    other = DataConfig(source=str(path), seq_len=8, num_calibration=5, seed=1, cache_dir=str(tmp_path / "c"))
    assert not torch.equal(other.calibration_windows(tok), calib)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2  # one token cache per split
    assert data.seq_len == 8 and "calibration 5" in data.describe() and str(path) in data.describe()
    with pytest.raises(Exception, match="frozen|cannot assign"):
        data.seq_len = 16


@pytest.mark.parametrize("kw", [{"seq_len": 1}, {"num_calibration": 0}, {"batch_size": 0},
                                {"max_eval_windows": 0}, {"seq_len": 8.0}])
def test_data_config_validation(kw):
    with pytest.raises(ValueError, match=f"data.{next(iter(kw))}="):
        DataConfig(**kw)


def test_data_config_too_short_stream(tok, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("a b")
    data = DataConfig(source=f"train={f},eval={f}", seq_len=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"the eval split of data source .* has \d+ tokens; one window needs "
                                         r"data\.seq_len=64"):
        data.eval_windows(tok)
    with pytest.raises(ValueError, match=r"the train split .* data\.seq_len=64"):
        data.calibration_windows(tok)
    assert os.path.isdir(tmp_path / "c")


# --- python-stdlib ---------------------------------------------------------------------------------


def test_python_stdlib_is_eval_only_source_code(tok, tmp_path):
    import platform

    from lsr.data.sources import STDLIB_MODULES, source_fingerprint, stdlib_files

    texts = load_texts("python-stdlib", "eval")
    assert len(texts) == len(STDLIB_MODULES) >= 10 and sum(map(len, texts)) > 150_000
    assert [f.stem for f in stdlib_files()] == list(STDLIB_MODULES)
    assert "def bisect_left(" in texts[STDLIB_MODULES.index("bisect")]
    assert load_texts("python-stdlib", "eval") == texts  # deterministic
    data = DataConfig(source="python-stdlib", seq_len=64, max_eval_windows=4, cache_dir=str(tmp_path / "c"))
    windows = data.eval_windows(tok)
    assert windows.shape == (4, 64)
    assert torch.equal(windows, join_and_tokenize(tok, texts)[:256].view(4, 64))
    assert torch.equal(DataConfig(source="python-stdlib", seq_len=64, max_eval_windows=4,
                                  cache_dir=str(tmp_path / "c")).eval_windows(tok), windows)
    message = "python-stdlib is an evaluation-only text: calibrate on another source"
    with pytest.raises(ValueError, match=message):
        load_texts("python-stdlib", "train")
    with pytest.raises(ValueError, match=message):
        data.calibration_windows(tok)
    assert platform.python_version() in source_fingerprint("python-stdlib")


# --- embedded-wiki-chat and eval_source ------------------------------------------------------------


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def test_chat_source_renders_the_wiki_articles_with_the_chat_template(tok, tmp_path):
    from lsr.data.sources import CHAT_QUESTIONS, embedded_wiki_conversations
    from lsr.data.windows import source_documents

    articles = embedded_wiki_articles("train")
    conversations = embedded_wiki_conversations("train")
    assert len(conversations) == len(articles)
    for (title, text), (user, assistant) in zip(articles[:50], conversations[:50], strict=True):
        assert user["role"] == "user" and user["content"] in {q.format(title) for q in CHAT_QUESTIONS}
        assert assistant == {"role": "assistant", "content": text}
    used = {q for (title, _), c in zip(articles[:200], conversations[:200], strict=True) for q in CHAT_QUESTIONS
            if q.format(title) == c[0]["content"]}
    assert used == set(CHAT_QUESTIONS)  # every question form is used
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        source_documents(tok, "embedded-wiki-chat", "train")
    tok.chat_template = CHATML
    try:
        docs = source_documents(tok, "embedded-wiki-chat", "eval")
        (title, text), question = embedded_wiki_articles("eval")[0], embedded_wiki_conversations("eval")[0][0]
        expected = f"<|im_start|>user\n{question['content']}<|im_end|>\n<|im_start|>assistant\n{text}<|im_end|>\n"
        assert docs[0] == expected
        assert title in question["content"]
    finally:
        tok.chat_template = None


def test_eval_source_evaluates_another_text_than_the_calibration(tok, corpus, tmp_path):
    path, _ = corpus
    cache = str(tmp_path / "c")
    calib_on_file = DataConfig(source=str(path), eval_source="python-stdlib", seq_len=8, num_calibration=2,
                               max_eval_windows=3, cache_dir=cache)
    assert torch.equal(calib_on_file.calibration_windows(tok),
                       DataConfig(source=str(path), seq_len=8, num_calibration=2, cache_dir=cache)
                       .calibration_windows(tok))
    assert torch.equal(calib_on_file.eval_windows(tok),
                       DataConfig(source="python-stdlib", seq_len=8, max_eval_windows=3, cache_dir=cache)
                       .eval_windows(tok))
    assert calib_on_file.describe().endswith("windows of python-stdlib)")
    assert calib_on_file.evaluated_source == "python-stdlib"
    assert DataConfig(source=str(path)).evaluated_source == str(path)
