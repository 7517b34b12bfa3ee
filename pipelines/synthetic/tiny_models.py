"""Tiny random-initialised stand-ins for the frozen preprocessing models and the evaluation's metric networks, built
locally and offline.

Each is an instance of the real class (diffusers' AutoencoderKL, transformers' CLIP / T5 / BLIP) with tiny widths,
saved with `save_pretrained` in the production repo layout, so `pipelines.encoders` and
`workloads.evaluate.image_metrics` load it through the same `from_pretrained` call as the real weights; the FID
network is a TorchScript file with the published Inception's call signature, loaded by the same `torch.jit.load`, and
so are the filters' score models and the deduplication's copy detector (SSCD's interface).
The VAE is the exception to random weights: it is the shapes autoencoder trained by the project (`shapes_vae`), so
images decoded from latents can be judged. Tokenizers are made here from a small corpus led by the shapes' own
captions (CLIP's BPE and the captioner's WordPiece trained with the `tokenizers` library, T5's Unigram vocabulary
from word counts), then wrapped in the real tokenizer classes. Widths match `model.conditioning.TINY_TEXT`.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from torch.nn import functional as F
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from model.conditioning import TINY_TEXT
from pipelines import geneval
from pipelines.synthetic.shapes import COLORS, MIN_SIZE, SHAPES, generate
from pipelines.synthetic.shapes_vae import shipped

MARKER = "COMPLETE.json"
TOKENS = 77
CORPUS_SYNTHETIC_SAMPLES = 200  # shapes samples whose synthetic captions join the tokenizers' corpus


@dataclass(frozen=True)
class TinyModels:
    """Paths of the tiny models: `repo` in SD3's diffusers layout, `captioner` a BLIP model and processor."""

    repo: str
    captioner: str


def caption_corpus() -> list[str]:
    """Shape and colour captions to train the tiny tokenizers on: every GenEval prompt over the shapes' classes and
    colours and the synthetic captions of a run of shapes samples (the shapes dataset's own captions, so each of their
    words is one token, as a real tokenizer has a token for each common word), then a wider vocabulary of colours,
    shapes and relations."""
    own = [m["prompt"] for tag in geneval.TAGS for m in geneval.distinct_prompts(tag, SHAPES, tuple(COLORS))]
    own += [s.synthetic_caption for s in generate(CORPUS_SYNTHETIC_SAMPLES, seed=0, size=MIN_SIZE)]
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "pink", "brown", "cyan"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "cross", "ring", "diamond"]
    relations = ["to the left of", "to the right of", "above", "below", "next to", "on top of"]
    counts = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", *"0123456789"]
    scenes = itertools.product(colours, shapes, relations, colours[::-1], shapes[::-1])
    corpus = [f"a {c1} {s1} {r} a {c2} {s2}" for c1, s1, r, c2, s2 in itertools.islice(scenes, 0, None, 11)]
    corpus += [f"{n} {c} {s}s on a {b} background" for n, c, s, b in zip(
        itertools.cycle(counts), itertools.cycle(colours), itertools.cycle(shapes), colours * 8, strict=False)]
    return own + corpus


def _clip_tokenizer(corpus: list[str]) -> CLIPTokenizer:
    """A byte-level BPE with CLIP's pre-tokenizer, `</w>` word ends and special tokens, in the CLIP class."""
    pipeline = CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and pre-tokenizer, empty vocabulary
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer, bpe.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    # ids in a fixed order, as the trainer numbers end-of-word tokens in hash order (another in every process): the
    # special tokens, like CLIP's every byte mid- and end-of-word, then each merge's token in merge order
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(ch + "</w>" for ch in alphabet), *map("".join, merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    assert vocab.keys() >= trained["vocab"].keys(), "tiny CLIP tokenizer: a trained token outside the fixed order"
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _t5_tokenizer(corpus: list[str]) -> T5Tokenizer:
    """A Unigram vocabulary in T5's class and ids (<pad> 0, </s> 1, <unk> 2): every word of the corpus as one
    SentencePiece-style piece ("▁word", scored by its log frequency; punctuation is not part of a word), then the
    printable ASCII characters and "▁" at a lower score, so a known word is one token and any other text still
    tokenizes. (The `tokenizers` Unigram trainer, on a corpus this small, kept no colour word whole.)"""
    words = collections.Counter(word for line in corpus for word in re.findall(r"\w+", line))
    total = sum(words.values())
    pieces = [(f"▁{w}", math.log(n / total)) for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    floor = math.log(1 / total) - 10.0
    pieces += [(piece, floor) for piece in ("▁", *(chr(c) for c in range(33, 127))) if piece not in dict(pieces)]
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces], extra_ids=0)


def _bert_tokenizer(corpus: list[str]) -> BertTokenizer:
    """A WordPiece vocabulary in BLIP's tokenizer class, with BLIP's decoder start token [DEC]."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = BertTokenizer().backend_tokenizer.normalizer
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=256, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                        "[DEC]"], show_progress=False)
    wordpiece.train_from_iterator(corpus, trainer)
    vocab = json.loads(wordpiece.to_str())["model"]["vocab"]
    return BertTokenizer(vocab=vocab, bos_token="[DEC]")


def _save_vae(path: Path, latent_channels: int = 16) -> None:
    """The shapes autoencoder the repository ships with `latent_channels` (`shapes_vae.shipped`: trained by the
    project, SD3's interface, its own latent normalisation in its config), copied into the SD3 layout: decoded latents
    show the shapes."""
    source = shipped(latent_channels)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"the shipped shapes autoencoder is missing from {source}: rebuild it with "
                                f"`python -m pipelines.synthetic.shapes_vae out={source} "
                                f"latent_channels={latent_channels}`")
    shutil.copytree(source, path)


def _save_clip(model_path: Path, tokenizer_path: Path, tokenizer: CLIPTokenizer, width: int) -> None:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, projection_dim=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS, hidden_act="gelu",
        # pooling reads the first <|endoftext|>; an eos id of 2 would select CLIP's legacy argmax pooling
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    assert config.eos_token_id != 2, "tiny CLIP tokenizer must not put <|endoftext|> at id 2"
    CLIPTextModelWithProjection(config).save_pretrained(model_path)
    tokenizer.model_max_length = TINY_TEXT.clip_tokens  # the tokens `TextEncoders` pads and cuts every caption to
    tokenizer.save_pretrained(tokenizer_path)


def _save_t5(model_path: Path, tokenizer_path: Path, tokenizer: T5Tokenizer) -> None:
    config = T5Config(  # T5 v1.1 flavour like SD3's T5-XXL: gated GELU, untied embeddings
        vocab_size=len(tokenizer), d_model=TINY_TEXT.t5_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(model_path)
    tokenizer.model_max_length = TINY_TEXT.t5_tokens
    tokenizer.save_pretrained(tokenizer_path)


def _save_captioner(path: Path, tokenizer: BertTokenizer) -> None:
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=16,
                              initializer_range=0.02)  # BLIP's default 1e-10 would make every image look alike
    text = BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          projection_dim=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                          sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32,
                        image_text_hidden_size=32)
    BlipForConditionalGeneration(config).save_pretrained(path)
    image_processor = BlipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def shipped_vae_version(latent_channels: int = 16) -> str:
    """A digest of the shipped autoencoder's weights: a cache built with other weights is rebuilt."""
    weights = sorted(shipped(latent_channels).glob("*.safetensors"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16] if weights else "missing"


def corpus_version() -> str:
    """A digest of the tokenizers' corpus: a cache whose tokenizers were trained on another corpus is rebuilt."""
    return hashlib.sha256("\n".join(caption_corpus()).encode()).hexdigest()[:16]


def build_tiny_models(out_dir: str, seed: int = 0, latent_channels: int = 16) -> TinyModels:
    """Build (or reuse, when a build with this seed completed) the tiny models under `out_dir`, with the shipped
    shapes autoencoder of `latent_channels` (other than 16, under `out_dir/latent-c<n>`, so builds do not clash).

    A file lock serialises concurrent builders (two drivers sharing a cache directory); the marker is written last,
    so an interrupted build is detected and redone.
    """
    root = Path(out_dir) if latent_channels == 16 else Path(out_dir) / f"latent-c{latent_channels}"
    root.mkdir(parents=True, exist_ok=True)
    tiny = TinyModels(repo=str(root / "sd3"), captioner=str(root / "captioner"))
    marker = root / MARKER
    with FileLock(root / ".build.lock"):
        build = {"seed": seed, "vae": shipped_vae_version(latent_channels), "corpus": corpus_version(),
                 "text_tokens": TINY_TEXT.clip_tokens}
        if marker.is_file() and {k: json.loads(marker.read_text()).get(k) for k in build} == build:
            return tiny
        marker.unlink(missing_ok=True)
        for partial in (tiny.repo, tiny.captioner):
            shutil.rmtree(partial, ignore_errors=True)
        _build(Path(tiny.repo), Path(tiny.captioner), seed, latent_channels)
        marker.write_text(json.dumps(build | {"repo": tiny.repo, "captioner": tiny.captioner}) + "\n")
    return tiny


def _build(repo: Path, captioner: Path, seed: int, latent_channels: int = 16) -> None:
    corpus = caption_corpus()
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        _save_vae(repo / "vae", latent_channels)
        torch.manual_seed(seed + 1)
        _save_clip(repo / "text_encoder", repo / "tokenizer", _clip_tokenizer(corpus), TINY_TEXT.clip_l_dim)
        torch.manual_seed(seed + 2)
        _save_clip(repo / "text_encoder_2", repo / "tokenizer_2", _clip_tokenizer(corpus), TINY_TEXT.clip_g_dim)
        torch.manual_seed(seed + 3)
        _save_t5(repo / "text_encoder_3", repo / "tokenizer_3", _t5_tokenizer(corpus))
        torch.manual_seed(seed + 4)
        _save_captioner(captioner, _bert_tokenizer(corpus))


def build_tiny_clip(path: str, seed: int = 0) -> str:
    """A tiny random `CLIPModel` and its `CLIPProcessor` (32 px images, the shapes tokenizer) saved under `path`, the
    layout of openai/clip-vit-large-patch14, for the CLIP score."""
    tokenizer = _clip_tokenizer(caption_corpus())
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


class TinyInception(nn.Module):
    """Two random convolutions in the published FID Inception's interface (NVIDIA's TorchScript
    `inception-2015-12-05.pt`): uint8 (B, 3, H, W) images of any size, resized inside, to (B, 16) pool features."""

    def __init__(self, side: int = 32, features: int = 16) -> None:
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, features, 3, stride=2)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        # no classifier: the features whatever return_features says (FID asks for them)
        x = F.interpolate(img.to(torch.float32), size=(self.side, self.side), mode="bilinear", align_corners=False)
        x = (x - 128) / 128  # (B, 3, S, S), the Inception's input scaling
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, F, S / 4 - 1, S / 4 - 1)
        return x.mean(dim=(2, 3))  # (B, F)


def _save_script(network: nn.Module, path: str) -> str:
    with warnings.catch_warnings():  # deprecated in torch 2.13, yet the format these networks are published in
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        torch.jit.script(network.eval()).save(path)
    return path


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_inception(path: str, seed: int = 0) -> str:
    """A `TinyInception` saved as a TorchScript file at `path`, as the real FID network is published."""
    return _save_script(_seeded(TinyInception, seed), path)


class TinyScorer(nn.Module):
    """A random per-image score in the interface of preprocessing's filters: (B, 3, S, S) floats in [0, 1] -> (B,)
    (the shape of a scripted CLIP + MLP aesthetic or NSFW predictor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        # a 1x1 convolution, not nn.Linear: DeepSpeed's ZeRO-3 leaves F.linear replaced in a process that built a
        # ZeRO-3 engine (the unit tests do), and a module scripted there fails to save
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.head(F.relu(self.conv(images * 2 - 1)))  # (B, 1, h, w)
        return x.mean(dim=(1, 2, 3))  # (B,)


class TinyCopyDetector(nn.Module):
    """A random copy-detection network in SSCD's TorchScript interface: (B, 3, S, S) ImageNet-normalised floats ->
    (B, 32) descriptors."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, stride=4)
        self.conv2 = nn.Conv2d(8, dim, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(images))))  # (B, D, h, w)
        return x.mean(dim=(2, 3))  # (B, D)


def build_tiny_scorer(path: str, seed: int = 0) -> str:
    return _save_script(_seeded(TinyScorer, seed), path)


def build_tiny_copy_detector(path: str, seed: int = 0) -> str:
    return _save_script(_seeded(TinyCopyDetector, seed), path)
