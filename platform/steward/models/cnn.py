"""A configurable convolutional classifier for images."""

from torch import Tensor, nn

from steward.data.info import DataInfo
from steward.errors import StewardError
from steward.spec.model import CNNParams

# The feature map is pooled to at most this size before the head: it keeps the coarse layout
# (which half of a digit a stroke is in) while the head stays independent of the image size.
HEAD_GRID = 2


def image_geometry(info: DataInfo) -> tuple[int, int, int]:
    """(channels, height, width) of the images described by `info`: input_shape is (H, W) or (C, H, W)."""
    shape = tuple(info.input_shape)
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    raise StewardError(f"data.input_shape: images need (H, W) or (C, H, W), got {shape}")


def conv_block(in_channels: int, out_channels: int, kernel_size: int, pool: bool) -> nn.Sequential:
    """Conv (same padding) -> BatchNorm -> ReLU, then a 2x2 max-pool when `pool`."""
    layers: list[nn.Module] = [
        # bias is redundant: BatchNorm subtracts the mean right after.
        nn.Conv2d(in_channels, out_channels, kernel_size, padding="same", bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CNNClassifier(nn.Module):
    """Conv blocks, a small pooled grid, dropout, one hidden layer and a classifier head.

    forward(inputs [B, H, W] or [B, C, H, W], attention_mask ignored) -> logits [B, num_classes].
    """

    def __init__(self, params: CNNParams, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        blocks = []
        channels = in_channels
        for out_channels in params.channels:
            # Pooling stops once the map is 2x2: one more halving would leave a single pixel.
            pool = params.pool and min(height, width) > 2
            blocks.append(conv_block(channels, out_channels, params.kernel_size, pool))
            channels = out_channels
            if pool:
                height, width = height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        grid = (min(height, HEAD_GRID), min(width, HEAD_GRID))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(params.dropout),
            nn.Linear(channels * grid[0] * grid[1], params.hidden_size),
            nn.ReLU(inplace=True),
            nn.Dropout(params.dropout),
            nn.Linear(params.hidden_size, num_classes),
        )

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Class logits [B, num_classes]; `attention_mask` is accepted for a uniform interface and ignored."""
        if inputs.dim() == 3:
            inputs = inputs.unsqueeze(1)
        if inputs.dim() != 4 or inputs.shape[1] != self.in_channels:
            raise ValueError(
                f"CNN inputs must be [B, H, W] or [B, {self.in_channels}, H, W], got {tuple(inputs.shape)}"
            )
        return self.head(self.pool(self.features(inputs)))


def build_cnn(params: CNNParams, info: DataInfo) -> CNNClassifier:
    """The CNN for image data described by `info`."""
    channels, height, width = image_geometry(info)
    return CNNClassifier(params, channels, height, width, int(info.num_classes or 0))


def cnn_problems(params: CNNParams, info: DataInfo) -> list[str]:
    """Why `params` cannot be built for `info`, as "model.params.<field>: ..." strings."""
    if info.modality != "image":
        return []  # the family/modality mismatch is reported once, by the registry
    try:
        _, height, width = image_geometry(info)
    except StewardError as error:
        return [str(error)]
    if params.kernel_size > min(height, width):
        return [
            f"model.params.kernel_size: {params.kernel_size} is larger than the {height}x{width} image; "
            f"use kernel_size <= {min(height, width)}"
        ]
    return []
