"""Captioning a collection of image files: the parts of the `caption-images` command (caption_model/cli.py puts
them together), one job per module, imports pointing down (cli -> bulk -> the model):

    files.py       which files: paths, folders and globs -> the listing; a file's identity (its absolute path)
    processes.py   one process, or many started by `accelerate launch`: rank, device, broadcast, gather
    shards.py      batches cut at fixed places of the listing, dealt to processes; part files; the merge
    formats.py     the output file: JSON Lines, CSV, Parquet or a captioned imagefolder (metadata.jsonl)
    loading.py     decoding and preprocessing the next batches on worker threads while the model runs
    captioning.py  one process's share: batches -> captions -> rows in its part file (+ heatmap strips)
    strips.py      a heatmap strip: the image, then one overlay per word
"""


class UsageError(Exception):
    """Bad arguments or inputs: the message says what was expected and what came (exit status 2).

    `echo` is False on the processes that stop because process 0 found the error: it alone prints it."""

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo
