"""Model recipes of the reference pipelines: configs, tokenizer, and untrained components.

    >>> from pipelines.zoo.recipes import RECIPES, build_components
    >>> parts = build_components(RECIPES["shapes-t2i"])
    >>> sorted(parts)     # ['scheduler', 'text_encoder', 'tokenizer', 'transformer', 'vae']

A recipe fixes the architecture and the training schedule; :mod:`pipelines.zoo.train` trains it.
The sizes respect DESIGN § 4: PixArt's `sample_size` is 32 with an 8x VAE, so a default call
generates 256 x 256 images; the Wan VAE keeps its spatial factor of 8. Schedulers are exact ones:
DDIM without clipping for PixArt (its pipeline needs `init_noise_sigma`), flow-matching Euler for Wan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .shapes import vocabulary

SPECIAL = ("<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild and retrain one reference model."""

    name: str
    kind: str                                   # "t2i" (PixArt) or "t2v" (Wan)
    # text encoder (T5)
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 40                   # training length; the pipeline pads further, masked
    # weight of an auxiliary loss on the text encoder: a linear head (training only, not shipped) reads
    # every word of an object's phrase back into that object's colour, shape, size and cell. Trained on
    # the denoising loss alone, the shipped encoder's colour word told its own object's cell apart from
    # the others' at 44 % (linear probe; chance 11 %): one cross-attention lookup cannot bind a colour to
    # a place the key of that colour word does not carry
    text_aux_weight: float = 0.0
    # Wan only: the text length the denoiser is trained at (WanPipeline's `max_sequence_length`; None:
    # the pipeline's default, 512). Wan's cross-attention has no text mask, so every padding position is
    # a key of its own: 500 of them drown the ten words of a caption (qk-normed logits differ by at most
    # about sqrt(head_dim)); even at 40, the 30 padding keys drew 62-84 % of the cross-attention mass
    # after 2000 steps. Captions shorter than this are padded, longer ones cut (as the pipeline does)
    text_pad_length: int | None = None
    # denoiser
    layers: int = 6
    heads: int = 6
    head_dim: int = 32
    patch: int = 2
    # VAE
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)
    latent_channels: int = 4
    vae_temporal: tuple[bool, ...] = (False, True, True)   # Wan VAE: which down stages also halve time
    # data
    image_size: int = 256
    frames: int = 1
    max_objects: int | None = None   # None: shapes.MAX_OBJECTS for the kind (images 3, clips 1)
    train_count_weights: tuple[float, ...] | None = None   # training scenes: weights of 1, 2, ... objects
    train_scenes: int = 20_000
    partial_captions: float = 0.15
    caption_dropout: float = 0.1
    # optimisation
    vae_steps: int = 1500
    vae_batch: int = 4
    vae_crop: int = 256                          # full images: crops shift GroupNorm's statistics
    vae_frames: int = 1
    vae_lr: float = 1e-3
    vae_fg_weight: float = 0.0                   # extra loss weight on object pixels (sparse objects)
    # images only: after the VAE stage the evaluator must read the colour of at least this share of the
    # objects in the VAE's reconstructions of 64 calibration scenes, or training stops there with an
    # error. A from-scratch rerun of shapes-t2i on an AMD EPYC CPU got a VAE that decoded red, blue,
    # cyan, yellow and orange as two hues (colour read 32 %; the shipped VAE: 100 %), and a denoiser on
    # its latents read colour 41 % at step 3000: hours of training that cannot reach the targets
    vae_min_colour: float = 0.0
    steps: int = 5000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 200
    flow_uniform: float = 0.0                   # rectified flow: share of noise levels drawn uniformly
    high_noise: float = 0.0                     # DDIM v-prediction: share of timesteps drawn from the upper half
    # rectified flow: noise levels s are moved up by SD3's shift, s -> k s / (1 + (k - 1) s). Started from
    # pure noise, the t2v model at 4000 steps drew empty clips, yet from 90 % noise on a training clip it
    # drew the object where the caption said: the layout is decided at the highest levels
    flow_shift: float = 1.0
    # Wan only: single-frame samples added to every step (one later latent frame of a training clip,
    # drawn at random): joint image-video training, 64 tokens a sample instead of 576
    image_batch: int = 0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0

    def replace(self, **kw) -> Recipe:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The recipe a training run recorded (`WORK/recipe.json`; JSON turned its tuples into lists).

            >>> Recipe.from_dict(vars(RECIPES["shapes-t2i"])) == RECIPES["shapes-t2i"]    # True
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"not a reference-model recipe: unknown fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


RECIPES: dict[str, Recipe] = {
    # the text head (text_aux_weight) is what made multi-object scenes bind: trained without it, the same
    # recipe drew every prompted object at its cell but took colours and shapes from the wrong phrases
    # (53.7 % adherence on 200 held-out prompts; docs/reference_models.md)
    # 7000 steps: the shipped weights are a 5000-step run continued to 7000 (`--steps 7000` on the finished
    # run re-spreads the cosine, a warm restart at 28 % of the peak lr); shape 76.5 -> 79.9 %, fully
    # correct 56.5 -> 62.5 % on 200 held-out prompts. From scratch in one go: 2 h 27 min on a 2-core Intel
    # Xeon (VAE 14.5 min + latents ~5 + 7000 x 1.10 s); 95.4 % adherence, 69 % fully correct, 14 of the fixed 20.
    # On a 2-core AMD EPYC the denoiser takes 1.80 s a step (about 3 h 50 min in all), and that run's VAE lost
    # colours (vae_min_colour now stops such a run after the VAE stage). vae_fg_weight=9 (as shapes-t2v) since
    # 2026-12-08: on that CPU its VAE stage read colour back at 100 % for seeds 0 and 1 (33 % without it).
    # The shipped weights predate it: their VAE was trained without the weight (and reads colour at 100 %)
    "shapes-t2i": Recipe(name="shapes-t2i", kind="t2i", text_aux_weight=0.1, steps=7000, vae_min_colour=0.95,
                         vae_fg_weight=9.0),
    # 17 frames of 128 x 128, the VAE halving time once: 9 latent frames of 8 x 8 patches = 576 video
    # tokens per clip. One moving object per clip (shapes.MAX_OBJECTS). 6 layers x 128 wide, 8 clips and
    # 32 single frames a step: 0.7 s on two CPU threads. Clip-only runs at 4 layers ignored their captions
    # (33 % adherence, chance 27 %; a model overfitted on 8 clips generated the same clip for all 8
    # captions): the few object tokens of a clip carry little of the loss. The single-frame samples
    # teach caption -> layout at a ninth of the tokens, as Wan's joint image-video training does. The
    # first recipe (29 frames, 4x temporal compression, 8 latent channels, two objects) trained to
    # chance level: its VAE lost multi-object detail (17-19 dB) and the denoiser learnt no attributes
    "shapes-t2v": Recipe(
        name="shapes-t2v", kind="t2v", image_size=128, frames=17, layers=6, heads=4, head_dim=32,
        vae_channels=(8, 16, 32, 32), latent_channels=16, vae_temporal=(False, False, True),
        vae_fg_weight=9.0, vae_steps=1500, vae_batch=4, vae_crop=64, vae_frames=9,
        train_scenes=3000, steps=7000, batch=8, image_batch=32, flow_uniform=0.5, flow_shift=3.0,
        text_pad_length=12,
    ),
}


def tiny_recipe(name: str) -> Recipe:
    """A seconds-long version of a recipe, for tests of the training code."""
    r = RECIPES[name]
    return r.replace(text_dim=32, text_layers=1, text_heads=2, layers=1, heads=2, head_dim=8,
                     vae_channels=(8, 8, 8, 8), train_scenes=16, vae_steps=2, vae_batch=2, vae_crop=32,
                     steps=3, batch=2, image_batch=min(r.image_batch, 2), warmup=1, checkpoint_every=2,
                     vae_min_colour=0.0)


def build_tokenizer(max_length: int = 120) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the shapes vocabulary; appends `</s>` like T5's."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_length, padding_side="right",
    )


def build_text_encoder(r: Recipe, vocab_size: int):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (T5Config, T5EncoderModel) if r.kind == "t2i" else (UMT5Config, UMT5EncoderModel)
    cfg = config_cls(
        vocab_size=vocab_size, d_model=r.text_dim, d_kv=r.text_dim // r.text_heads, d_ff=2 * r.text_dim,
        num_layers=r.text_layers, num_heads=r.text_heads, relative_attention_num_buckets=16,
        relative_attention_max_distance=64, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )
    return model_cls(cfg)


def build_vae(r: Recipe):
    if r.kind == "t2i":
        from diffusers import AutoencoderKL

        n = len(r.vae_channels)
        return AutoencoderKL(
            # two groups per GroupNorm: one channel per group would normalise each channel's level
            # over the image away, and with it the colour of flat shapes
            block_out_channels=r.vae_channels, latent_channels=r.latent_channels, norm_num_groups=2,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=1, mid_block_add_attention=False, sample_size=r.image_size,
        )
    if r.kind == "t2v":
        from diffusers import AutoencoderKLWan

        base = r.vae_channels[0]
        return AutoencoderKLWan(
            base_dim=base, z_dim=r.latent_channels, dim_mult=[c // base for c in r.vae_channels],
            num_res_blocks=1, attn_scales=[], temperal_downsample=list(r.vae_temporal),
            # WanPipeline sizes its latents from this, not from `temperal_downsample`
            scale_factor_temporal=2 ** sum(r.vae_temporal),
            latents_mean=[0.0] * r.latent_channels, latents_std=[1.0] * r.latent_channels,
        )
    raise ValueError(f"unknown recipe kind {r.kind!r}")


def build_transformer(r: Recipe):
    if r.kind == "t2i":
        from diffusers import PixArtTransformer2DModel

        factor = 2 ** (len(r.vae_channels) - 1)
        return PixArtTransformer2DModel(
            sample_size=r.image_size // factor, patch_size=r.patch, in_channels=r.latent_channels,
            out_channels=r.latent_channels, num_layers=r.layers, attention_head_dim=r.head_dim,
            num_attention_heads=r.heads, cross_attention_dim=r.heads * r.head_dim, caption_channels=r.text_dim,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=False,
        )
    if r.kind == "t2v":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(
            patch_size=(1, r.patch, r.patch), num_attention_heads=r.heads, attention_head_dim=r.head_dim,
            in_channels=r.latent_channels, out_channels=r.latent_channels, text_dim=r.text_dim, freq_dim=64,
            ffn_dim=4 * r.heads * r.head_dim, num_layers=r.layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
        )
    raise ValueError(f"unknown recipe kind {r.kind!r}")


def build_scheduler(r: Recipe):
    if r.kind == "t2i":
        # PixArt's pipeline needs `init_noise_sigma`, which the flow-matching scheduler lacks: DDIM
        # without sample clipping, v-prediction on a zero-terminal-SNR schedule (the first of
        # "trailing" timesteps is pure noise, as the pipeline's initial latents are)
        from diffusers import DDIMScheduler

        return DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction",
            rescale_betas_zero_snr=True, timestep_spacing="trailing",
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_components(r: Recipe, seed: int | None = None) -> dict:
    torch.manual_seed(r.seed if seed is None else seed)
    tokenizer = build_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": build_text_encoder(r, len(tokenizer)),
        "vae": build_vae(r),
        "transformer": build_transformer(r),
        "scheduler": build_scheduler(r),
    }


def assemble(r: Recipe, components: dict):
    """The diffusers pipeline of a recipe from its components."""
    if r.kind == "t2i":
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline(**components)
    if r.kind == "t2v":
        from diffusers import WanPipeline

        return WanPipeline(**components)
    raise ValueError(f"unknown recipe kind {r.kind!r}")
