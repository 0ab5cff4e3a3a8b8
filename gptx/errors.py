"""User-facing errors. Entry points print their message as one line and exit non-zero."""


class GptxError(Exception):
    """Bad input the user can fix; the message names the field or file and what is expected."""


class ConfigError(GptxError, ValueError):
    """A model/training config or DeepSpeed JSON problem."""


class DataError(GptxError):
    """Missing, malformed or unsuitable token data, or no tokenizer."""


class CheckpointError(GptxError):
    """A checkpoint that is missing, incomplete or does not match the model."""


class TrainingStopped(GptxError):
    """Numerical trouble the run cannot recover from; nothing after the last good checkpoint is saved."""


class PeerFailure(GptxError):
    """Another rank hung or died; each rank reports what it saw, so it is printed on every rank."""

    every_rank = True
