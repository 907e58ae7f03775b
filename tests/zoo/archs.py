"""The compatibility zoo: architectures from torchvision, timm, Hugging Face transformers and
torch itself, each in a tiny configuration with random weights (built offline), and the two
tasks they learn: scikit-learn's digits as 3 x 32 x 32 images, and the same digits as
sequences of 64 pixel tokens. `benchmarks/zoo_matrix.py` runs each through the whole chain.

Each entry is `name: (family, task, builder)`; pipelines reference builders as
`archs.py:build` with `kwargs: {name: ...}`, as a user's pipeline would reference their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CLASSES = 10
IMAGE = 32
TOKENS = 64  # an 8 x 8 digit, one token per pixel
VOCAB = 20  # pixel values 0..16, shifted by one (0 is padding), and spares


# -- data ---------------------------------------------------------------------------------------
def _digits(n_train: int, n_test: int) -> tuple[Any, ...]:
    """Train, validation and test digits: the test part of a stratified 80/20 split, and from
    its training part the first `n_train` for training and the next `n_test` (as many as are
    left) for validation, so a stage that chooses on validation never sees the test digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y)
    val = slice(n_train, n_train + n_test)
    return (x_train[:n_train], y_train[:n_train], x_train[val], y_train[val],
            x_test[:n_test], y_test[:n_test])


def digit_images(n_train: int = 320, n_test: int = 160) -> dict[str, Any]:
    """Digits upsampled to 3 x 32 x 32 (grey in every channel), pixels in [0, 1]."""
    from torch.utils.data import TensorDataset

    x_tr, y_tr, x_va, y_va, x_te, y_te = _digits(n_train, n_test)

    def ds(x: Any, y: Any) -> TensorDataset:
        t = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        t = nn.functional.interpolate(t, size=IMAGE, mode="bilinear", align_corners=False)
        return TensorDataset(t.expand(-1, 3, -1, -1).contiguous(), torch.tensor(y))

    return {"train": ds(x_tr, y_tr), "val": ds(x_va, y_va), "test": ds(x_te, y_te)}


def digit_tokens(n_train: int = 320, n_test: int = 160) -> dict[str, Any]:
    """Digits as 64 token ids (pixel value + 1) with an attention mask over all of them."""
    x_tr, y_tr, x_va, y_va, x_te, y_te = _digits(n_train, n_test)

    def ds(x: Any, y: Any) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        ids = torch.tensor(x, dtype=torch.long) + 1
        return [((i, torch.ones_like(i)), label) for i, label in zip(ids, torch.tensor(y),
                                                                       strict=True)]

    return {"train": ds(x_tr, y_tr), "val": ds(x_va, y_va), "test": ds(x_te, y_te)}


# -- models of our own: the teachers, an MLP, torch's own transformer ----------------------------
class ImageTeacher(nn.Module):
    """A small CNN that learns the digit images well in a few epochs."""

    def __init__(self, width: int = 16):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.BatchNorm2d(4 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * c, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # type: ignore[no-any-return]


class TokenTeacher(nn.Module):
    """Token embeddings, position embeddings and a small CNN over the 8 x 8 grid."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, dim))
        self.body = ImageTeacher(16)
        self.body.features[0] = nn.Conv2d(dim, 16, 3, 1, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = (self.embed(input_ids) + self.position) * attention_mask.unsqueeze(-1)
        return self.body(x.transpose(1, 2).reshape(x.shape[0], -1, 8, 8))  # type: ignore[no-any-return]


class Mlp(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear over the flattened image."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE * IMAGE, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention inside) over the pixel tokens."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(input_ids) + self.position,
                         src_key_padding_mask=attention_mask == 0)
        return self.head(x.mean(1))  # type: ignore[no-any-return]


# -- torchvision ---------------------------------------------------------------------------------
def _tv() -> Any:
    import torchvision

    return torchvision.models


def tv_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def tv_mobilenet_v3() -> nn.Module:
    return _tv().mobilenet_v3_small(num_classes=CLASSES, width_mult=0.5)  # type: ignore[no-any-return]


def tv_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.34)
    return EfficientNet(setting, 0.2, last_channel=last, num_classes=CLASSES)


def tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return ConvNeXt(stages, num_classes=CLASSES)


def tv_regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8),
                  num_classes=CLASSES)


def tv_shufflenet() -> nn.Module:
    return _tv().shufflenet_v2_x0_5(num_classes=CLASSES)  # type: ignore[no-any-return]


def tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=2, num_heads=4,
                             hidden_dim=32, mlp_dim=64, num_classes=CLASSES)


def tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                           window_size=[4, 4], num_classes=CLASSES)


# -- timm ----------------------------------------------------------------------------------------
def _timm(name: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)  # type: ignore[no-any-return]


# -- Hugging Face transformers -------------------------------------------------------------------
def _hf(model: str, config: str, **kwargs: Any) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config)(num_labels=CLASSES, **kwargs)
    cfg._attn_implementation = "eager"
    return getattr(transformers, model)(cfg)  # type: ignore[no-any-return]


def _torch_init(model: nn.Module) -> nn.Module:
    """torch's own initialisation of convs, linears and norms. HF's EfficientNet draws every
    conv *and BatchNorm* weight from N(0, 0.02): each block then shrinks its input ~100x, and a
    randomly initialised network's output does not depend on its input at all (pretrained
    weights, what users load, are healthy). The zoo wants a network that can learn."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()
    return model


_VIT = dict(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64)
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=TOKENS + 2)

ARCHS: dict[str, tuple[str, str, Callable[[], nn.Module]]] = {
    "torchvision resnet": ("torchvision", "image", tv_resnet),
    "torchvision mobilenet_v3_small": ("torchvision", "image", tv_mobilenet_v3),
    "torchvision efficientnet_b0": ("torchvision", "image", tv_efficientnet),
    "torchvision convnext": ("torchvision", "image", tv_convnext),
    "torchvision regnet": ("torchvision", "image", tv_regnet),
    "torchvision shufflenet_v2": ("torchvision", "image", tv_shufflenet),
    "torchvision vit": ("torchvision", "image", tv_vit),
    "torchvision swin": ("torchvision", "image", tv_swin),
    "timm resnet10t": ("timm", "image", lambda: _timm("resnet10t")),
    "timm mobilenetv3_small_050": ("timm", "image", lambda: _timm("mobilenetv3_small_050")),
    "timm tinynet_e": ("timm", "image", lambda: _timm("tinynet_e")),
    "timm convnext_atto": ("timm", "image", lambda: _timm("convnext_atto")),
    "timm vit_tiny": ("timm", "image", lambda: _timm(
        "vit_tiny_patch16_224", img_size=IMAGE, patch_size=8, depth=2)),
    "HF ViT": ("transformers", "image", lambda: _hf(
        "ViTForImageClassification", "ViTConfig", **_VIT)),
    "HF DeiT": ("transformers", "image", lambda: _hf(
        "DeiTForImageClassification", "DeiTConfig", **_VIT)),
    "HF ConvNeXt": ("transformers", "image", lambda: _hf(
        "ConvNextForImageClassification", "ConvNextConfig", image_size=IMAGE,
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    "HF Swin": ("transformers", "image", lambda: _hf(
        "SwinForImageClassification", "SwinConfig", image_size=IMAGE, patch_size=4,
        embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)),
    "HF EfficientNet": ("transformers", "image", lambda: _torch_init(_hf(
        "EfficientNetForImageClassification", "EfficientNetConfig", image_size=IMAGE,
        width_coefficient=0.25, depth_coefficient=0.34, hidden_dim=320))),
    "HF MobileNetV2": ("transformers", "image", lambda: _hf(
        "MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=IMAGE,
        depth_multiplier=0.35)),
    "HF ResNet": ("transformers", "image", lambda: _hf(
        "ResNetForImageClassification", "ResNetConfig", embedding_size=16,
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
    "HF BERT": ("transformers", "text", lambda: _hf(
        "BertForSequenceClassification", "BertConfig", **_TEXT)),
    "HF DistilBERT": ("transformers", "text", lambda: _hf(
        "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=32,
        n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=TOKENS + 2)),
    "HF RoBERTa": ("transformers", "text", lambda: _hf(
        "RobertaForSequenceClassification", "RobertaConfig", pad_token_id=0, **_TEXT)),
    "torch TransformerEncoder": ("torch", "text", TorchEncoder),
    "torch MLP": ("torch", "image", Mlp),
}


# -- the extended zoo: architectures tried after the first 25, each of which stopped the chain
# somewhere until it was fixed (benchmarks/zoo_matrix.py --more; not in the CI test's time) --
def tv_densenet() -> nn.Module:
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                    num_classes=CLASSES)


def tv_resnext() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8, num_classes=CLASSES)


def tv_maxvit() -> nn.Module:
    from torchvision.models import MaxVit

    return MaxVit(input_size=(IMAGE, IMAGE), stem_channels=16, partition_size=2,
                  block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                  stochastic_depth_prob=0.0, num_classes=CLASSES)


def timm_mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=CLASSES, img_size=IMAGE, patch_size=8, num_blocks=2,
                    embed_dim=64)


_PYRAMID = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=TOKENS, pad_token_id=0)

MORE: dict[str, tuple[str, str, Callable[[], nn.Module]]] = {
    "torchvision mobilenet_v2": ("torchvision", "image", lambda: _tv().mobilenet_v2(
        num_classes=CLASSES, width_mult=0.35)),
    "torchvision squeezenet1_1": ("torchvision", "image", lambda: _tv().squeezenet1_1(
        num_classes=CLASSES)),
    "torchvision googlenet": ("torchvision", "image", lambda: _tv().googlenet(
        num_classes=CLASSES, aux_logits=False, init_weights=True)),
    "torchvision mnasnet0_5": ("torchvision", "image", lambda: _tv().mnasnet0_5(
        num_classes=CLASSES)),
    "torchvision densenet": ("torchvision", "image", tv_densenet),
    "torchvision resnext": ("torchvision", "image", tv_resnext),
    "torchvision maxvit": ("torchvision", "image", tv_maxvit),
    "timm mixnet_s": ("timm", "image", lambda: _timm("mixnet_s")),
    "timm ghostnet_050": ("timm", "image", lambda: _timm("ghostnet_050")),
    "timm repvgg_a0": ("timm", "image", lambda: _timm("repvgg_a0")),
    "timm lcnet_050": ("timm", "image", lambda: _timm("lcnet_050")),
    "timm regnetx_002": ("timm", "image", lambda: _timm("regnetx_002")),
    "timm resnest14d": ("timm", "image", lambda: _timm("resnest14d")),
    "timm skresnet18": ("timm", "image", lambda: _timm("skresnet18")),
    "timm rexnet_100": ("timm", "image", lambda: _timm("rexnet_100")),
    "timm nf_resnet26": ("timm", "image", lambda: _timm("nf_resnet26")),
    "timm hgnetv2_b0": ("timm", "image", lambda: _timm("hgnetv2_b0")),
    "timm mobilevit_xxs": ("timm", "image", lambda: _timm("mobilevit_xxs")),
    "timm efficientvit_b0": ("timm", "image", lambda: _timm("efficientvit_b0")),
    "timm edgenext_xx_small": ("timm", "image", lambda: _timm("edgenext_xx_small")),
    "timm fastvit_t8": ("timm", "image", lambda: _timm("fastvit_t8")),
    "timm pvt_v2_b0": ("timm", "image", lambda: _timm("pvt_v2_b0")),
    "timm deit_tiny_distilled": ("timm", "image", lambda: _timm(
        "deit_tiny_distilled_patch16_224", img_size=IMAGE, patch_size=8, depth=2)),
    "timm mixer": ("timm", "image", timm_mixer),
    "HF BEiT": ("transformers", "image", lambda: _hf(
        "BeitForImageClassification", "BeitConfig", use_mean_pooling=True, **_VIT)),
    "HF DINOv2": ("transformers", "image", lambda: _hf(
        "Dinov2ForImageClassification", "Dinov2Config", **_VIT)),
    "HF LeViT": ("transformers", "image", lambda: _hf(
        "LevitForImageClassification", "LevitConfig", image_size=IMAGE,
        hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
        key_dim=[8, 8, 8])),
    "HF PVTv2": ("transformers", "image", lambda: _hf(
        "PvtV2ForImageClassification", "PvtV2Config", num_attention_heads=[1, 2, 3, 4],
        **_PYRAMID)),
    "HF Segformer": ("transformers", "image", lambda: _hf(
        "SegformerForImageClassification", "SegformerConfig",
        num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=64, **_PYRAMID)),
    "HF MobileViT": ("transformers", "image", lambda: _hf(
        "MobileViTForImageClassification", "MobileViTConfig", image_size=IMAGE,
        hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 40, 160])),
    "HF FocalNet": ("transformers", "image", lambda: _hf(
        "FocalNetForImageClassification", "FocalNetConfig", image_size=IMAGE, patch_size=4,
        embed_dim=16, depths=[1, 1])),
    "HF PoolFormer": ("transformers", "image", lambda: _hf(
        "PoolFormerForImageClassification", "PoolFormerConfig",
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
    "HF ConvNeXtV2": ("transformers", "image", lambda: _hf(
        "ConvNextV2ForImageClassification", "ConvNextV2Config", image_size=IMAGE,
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    "HF RegNet": ("transformers", "image", lambda: _hf(
        "RegNetForImageClassification", "RegNetConfig", embedding_size=16,
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8)),
    "HF BiT": ("transformers", "image", lambda: _hf(
        "BitForImageClassification", "BitConfig", embedding_size=32, num_groups=8,
        hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1])),
    "HF ALBERT": ("transformers", "text", lambda: _hf(
        "AlbertForSequenceClassification", "AlbertConfig", embedding_size=16, **_TEXT)),
    "HF ELECTRA": ("transformers", "text", lambda: _hf(
        "ElectraForSequenceClassification", "ElectraConfig", embedding_size=16, **_TEXT)),
    "HF DeBERTa-v2": ("transformers", "text", lambda: _hf(
        "DebertaV2ForSequenceClassification", "DebertaV2Config", **_TEXT)),
    "HF MobileBERT": ("transformers", "text", lambda: _hf(
        "MobileBertForSequenceClassification", "MobileBertConfig", embedding_size=16,
        intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2, **_TEXT)),
    "HF MPNet": ("transformers", "text", lambda: _hf(
        "MPNetForSequenceClassification", "MPNetConfig", pad_token_id=0, **_TEXT)),
    "HF GPT-2": ("transformers", "text", lambda: _hf(
        "GPT2ForSequenceClassification", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2,
        n_head=4, n_positions=TOKENS, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
    "HF Llama": ("transformers", "text", lambda: _hf(
        "LlamaForSequenceClassification", "LlamaConfig", num_key_value_heads=2, **_DECODER)),
}


NOT_CNN = {"torchvision vit", "torchvision swin", "timm vit_tiny", "HF ViT", "HF DeiT", "HF Swin",
           "HF BERT", "HF DistilBERT", "HF RoBERTa", "torch TransformerEncoder", "torch MLP"}
"""Transformers and MLPs: their INT8 coverage floor is 0.90; a CNN's is 0.95."""


# The extended zoo's attention, MLP-mixer and hybrid models take the 0.90 floor.
NOT_CNN |= {"torchvision maxvit", "timm mobilevit_xxs", "timm efficientvit_b0",
            "timm edgenext_xx_small", "timm fastvit_t8", "timm pvt_v2_b0",
            "timm deit_tiny_distilled", "timm mixer", *(
                n for n, (family, _, _) in MORE.items() if family == "transformers"
                and n not in {"HF PoolFormer", "HF ConvNeXtV2", "HF RegNet", "HF BiT"})}


def build(name: str) -> nn.Module:
    """The zoo architecture `name`, randomly initialised (what `source:` calls)."""
    return {**ARCHS, **MORE}[name][2]()
