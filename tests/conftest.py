"""Shared fixtures: tiny random models built from configs (seconds for the whole suite), CPU, fp32."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
# The suite behaves the same on CPUs with and without native bf16: `auto` is float32 everywhere (the
# tests of the choice itself set this per test); subprocesses the tests start inherit it.
os.environ["PEFTKIT_NATIVE_BF16"] = "0"
# `make test` runs two pytest workers on two cores (pytest-xdist): each test, and each process a test
# starts, gets one thread, since two threads per worker would make four on two cores (OpenMP spinning
# then costs far more than it gains).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

VOCAB = 64


def tiny_llama(tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


class TinyCNN(nn.Module):
    """A small image classifier: LoRA is architecture-agnostic, not only for transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 5)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))  # (N, 8, H/2, W/2)
        x = torch.relu(self.seq(x.flatten(2)))  # (N, 8, H*W/4)
        return self.fc2(torch.relu(self.fc1(x.mean(-1))))


def tiny_cnn() -> nn.Module:
    return TinyCNN().eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "cnn": tiny_cnn}


def model_input(kind: str, batch: int = 3, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return torch.randn(batch, 3, 8, 8, generator=g)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def output(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's main output tensor (logits for transformers)."""
    out = model(x, **kwargs) if not isinstance(x, dict) else model(**x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(autouse=True)
def _seed_and_threads(request: pytest.FixtureRequest):
    """Seed every test; run the tiny-model tests on one thread: with several, OpenMP start-up and
    spinning cost far more than the arithmetic (100x on a busy 2-core machine)."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    if "integration" not in request.keywords or WORKERS > 1:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer with <s>/</s> turn markers and a ChatML-like chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def one_thread_per_training_child():
    """The training children a module's tests start run on one thread: two OpenMP threads on a busy
    2-core machine are ten times slower for a tiny model, not faster (they spin). A module takes it
    with `pytestmark = pytest.mark.usefixtures("one_thread_per_training_child")`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A saved tiny random Llama with the character tokenizer: an HF model directory that
    `peftkit.load_base` (and so `peftkit train`) loads like any other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        # A wide init gives the frozen head a usable logit range: at the usual 0.02, RMS-normed hidden
        # states times the head span about +-0.6 logits, and no adapter could fit anything.
        initializer_range=0.25,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextmanager
def read_only(path: Path):
    """`path`, an existing directory, made one no one can write into for the block, root included (CI
    runs as root, who ignores mode bits): mode 0555, and for root also the immutable attribute
    (`chattr +i`); put back afterwards."""
    import subprocess

    path.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        probe = path / "probe"
        with pytest.raises(OSError):
            probe.touch()
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """An empty directory no one can write into (see `read_only`)."""
    path = tmp_path / "read-only"
    path.mkdir()
    with read_only(path):
        yield path


from postgres import postgres_server, postgres_url  # noqa: E402,F401


@pytest.fixture(scope="session")
def dates_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained on the built-in model for the `dates` task (24 steps of 8, lr 2e-3: 3 of
    the demo's 4 hand-written inputs right), trained once per test run: the first xdist worker to ask
    trains it under a lock in the run's shared temporary directory, the others wait and reuse it."""
    import fcntl

    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import train

    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    run, done = shared / "dates-adapter-24", shared / "dates-adapter-24.path"
    with open(shared / "dates-adapter-24.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("OMP_NUM_THREADS", "1")
                config = TrainConfig(base="smollm2-135m", data="task:dates", max_steps=24, batch_size=8, lr=2e-3,
                                     warmup_ratio=0.1, eval_every=24, val_fraction=0.01, output_dir=str(run))  # fmt: skip
                done.write_text(str(train(config, overwrite=True).adapter_dir))
    return Path(done.read_text())
