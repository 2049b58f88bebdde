"""The `data` section: where examples come from and how they are split and batched."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from steward.spec.base import Section

BUILTIN_SOURCES = ("digits", "synthetic-text", "synthetic-sequence")
FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


class TokenizerSpec(Section):
    kind: Literal["wordpiece", "bpe"] = Field(
        "wordpiece", description="Tokenizer trained on the training split when the model is not pretrained."
    )
    vocab_size: int = Field(2000, ge=50, le=200_000, description="Vocabulary size of the trained tokenizer.")


class DataSpec(Section):
    source: str = Field(
        description="`builtin:digits`, `builtin:synthetic-text`, `builtin:synthetic-sequence`, "
        "`file:<path>` (csv, jsonl, parquet, or a `save_to_disk` folder) or `hf:<dataset>[:<config>]`."
    )
    input_column: str | None = Field(None, description="Column holding model inputs; builtin sources have defaults.")
    label_column: str | None = Field(None, description="Column holding labels; not used for causal language modelling.")
    group_columns: list[str] = Field(
        default_factory=list,
        description="Attributes carried along for per-group evaluation and monitoring; never model inputs.",
    )
    splits: dict[str, float | str] = Field(
        default_factory=lambda: dict[str, float | str](train=0.8, validation=0.1, test=0.1),
        description="Either fractions of one table ({train: 0.8, validation: 0.1, test: 0.1}) "
        "or the source's own split names ({train: train, validation: validation, test: test}).",
    )
    batch_size: int = Field(32, ge=1, le=65_536, description="Micro-batch size per worker.")
    shuffle: bool = Field(True, description="Shuffle the training split every epoch (seeded).")
    max_length: int = Field(64, ge=4, le=8192, description="Token length that text is padded or truncated to.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer trained from scratch.")
    streaming: bool = Field(
        False,
        description="Stream the train split to the workers through Ray Data instead of loading it on each: the "
        "driver checks the rows and stages the split as Parquet in the run folder, and each worker reads and "
        "tokenizes only its shard, batch by batch, so its memory does not grow with the data. For file: and hf: "
        "sources; validation and test are read in memory for evaluation, and one of them is required.",
    )
    options: dict[str, int | float | str] = Field(
        default_factory=dict,
        max_length=64,
        description="Options of a builtin generator (e.g. num_samples, bias) or `datasets.load_dataset` kwargs.",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        scheme, _, rest = value.partition(":")
        if scheme == "builtin" and rest not in BUILTIN_SOURCES:
            raise ValueError(f"unknown builtin source {rest!r}; use one of {', '.join(BUILTIN_SOURCES)}")
        if scheme not in ("builtin", "file", "hf") or not rest:
            raise ValueError("source must look like `builtin:digits`, `file:data.csv` or `hf:imdb`")
        return value

    @field_validator("splits")
    @classmethod
    def _valid_splits(cls, value: dict[str, float | str]) -> dict[str, float | str]:
        if "train" not in value:
            raise ValueError("splits must name a `train` split")
        unknown = set(value) - {"train", "validation", "test"}
        if unknown:
            raise ValueError(f"unknown split {sorted(unknown)}; splits are train, validation and test")
        kinds = {isinstance(v, str) for v in value.values()}
        if len(kinds) > 1:
            raise ValueError("splits must be all fractions or all split names, not a mix")
        if kinds == {False}:
            fractions = [float(v) for v in value.values()]
            if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
                raise ValueError(f"split fractions must be positive and sum to 1 (they sum to {sum(fractions):g})")
        return value

    @model_validator(mode="after")
    def _groups_are_not_inputs(self) -> "DataSpec":
        clash = {c for c in (self.input_column, self.label_column) if c} & set(self.group_columns)
        if clash:
            raise ValueError(f"group_columns must not include the input or label column: {sorted(clash)}")
        return self

    @model_validator(mode="after")
    def _streams_from_files(self) -> "DataSpec":
        if self.streaming and self.scheme == "builtin":
            raise ValueError(
                "streaming reads file: and hf: sources; builtin data is generated in memory, "
                "so remove data.streaming or use a file: source"
            )
        if self.streaming and set(self.splits) == {"train"}:
            raise ValueError("streaming needs a validation or test split to evaluate on; add one to data.splits")
        return self

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]

    @property
    def location(self) -> str:
        return self.source.partition(":")[2]
