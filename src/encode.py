#!/usr/bin/env python3
"""Pre-encodes a text corpus to token shards (or an .npz) that train.py reads without encoding again.

The corpus streams through: files are read a few MB at a time, cut into pieces at places where
the BPE's words cannot change, and the pieces are encoded on every core at once; tokens go
straight to disk. Memory stays bounded whatever the corpus's size. With several processes, UTF-8
text is split into byte ranges cut at such places, which each process reads and encodes to its
own file; the main process only joins those files into shards, in order.
"""
import codecs
import collections
import concurrent.futures
import multiprocessing
import os
import re
import shutil
import signal
import zipfile

import numpy as np
import tqdm

import cli
import dataset
import encoder
import hparams as hparams_lib
import shards

TOKENIZERS = ("auto", "tiktoken", "builtin")
TIKTOKEN_PIN = "tiktoken==0.14.0"
# Pieces waiting or being encoded, per process: enough to keep each busy while the main process
# reads and writes, few enough that memory stays a few MB per process.
PIECES_PER_PROCESS = 3
# Bytes of text in one task of a process (a range of a large file, or small files together): small
# enough that the last tasks keep every process busy to the end.
TASK_BYTES = 1 << 24
# Tokens converted at a time when packing an .npz.
NPZ_SLICE = 1 << 22


def vocab_dir(model_name, models_dir):
    """The directory whose vocabulary to use: the model's when `models_dir/model_name` exists, else
    the bundled one, since every released GPT-2 size shares one vocabulary."""
    models_dir = os.path.expanduser(os.path.expandvars(str(models_dir)))
    model = os.path.join(models_dir, hparams_lib.resolve_model_name(model_name))
    return model if os.path.isdir(model) else encoder.default_vocab_dir()


def load_encoder(model_name, models_dir):
    """The `encoder.Encoder` of `vocab_dir(model_name, models_dir)`."""
    if vocab_dir(model_name, models_dir) == encoder.default_vocab_dir():
        return encoder.Encoder.from_dir(encoder.default_vocab_dir())
    return encoder.get_encoder(model_name, models_dir)


def ids_follow_merges(enc):
    """Whether each merge's token has id 256 + its rank, as in the released vocabulary: tiktoken
    merges by id, the reference by vocab.bpe's order, and only then do the two agree."""
    return all(enc.encoder.get(a + b) == 256 + rank for (a, b), rank in enc.bpe_ranks.items())


def tiktoken_encoding(enc):
    """A `tiktoken.Encoding` of `enc`'s own vocabulary (nothing downloaded), for its fast path.

    Args:
        enc: An `encoder.Encoder` whose ids follow its merges (`ids_follow_merges`).

    Returns:
        The Encoding; its `encode_ordinary` gives `enc.encode`'s ids.
    """
    import tiktoken

    ranks = {enc.decode_bytes([i]): i for token, i in enc.encoder.items() if token != encoder.END_OF_TEXT}
    return tiktoken.Encoding(name="gpt2-local", pat_str=encoder.SPLIT_PATTERN.pattern, mergeable_ranks=ranks,
                             special_tokens={})


def tiktoken_available():
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return False
    return True


def choose_tokenizer(tokenizer, enc):
    """Whether to encode with tiktoken: `auto` uses it where it is installed and gives `enc`'s ids."""
    if tokenizer not in TOKENIZERS:
        raise cli.UserError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if tokenizer == "builtin":
        return False
    if not tiktoken_available():
        if tokenizer == "auto":
            return False
        raise cli.UserError(f"tokenizer tiktoken needs the tiktoken package: pip install {TIKTOKEN_PIN}, "
                            f"or use tokenizer builtin")
    if not ids_follow_merges(enc):
        if tokenizer == "auto":
            return False
        raise cli.UserError("tiktoken cannot give this vocabulary's ids (its ids are not in vocab.bpe's merge "
                            "order): use tokenizer builtin")
    return True


def piece_encoder(enc, use_tiktoken):
    """text -> ids with the project's encoder, or tiktoken's equal fast path."""
    return tiktoken_encoding(enc).encode_ordinary if use_tiktoken else enc.encode


_worker = {}  # what a worker process encodes with, set once by `_start_worker`


def _start_worker(vocab, use_tiktoken, dtype):
    # Ctrl-C reaches the whole process group; the main process alone answers it, stopping the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    enc = encoder.Encoder.from_dir(vocab)
    _worker.update(encode=piece_encoder(enc, use_tiktoken), dtype=dtype, eot=enc.eot_token)


def _encode_piece(piece):
    return np.array(_worker["encode"](piece), dtype=_worker["dtype"])


def _encode_ranges(segments, out, piece_chars):
    """Encodes the text of each (file, start, end) of `segments`, each cut at `dataset.cut_offset`
    of its bounds, into the file `out` (raw ids, one segment after another); returns each one's
    (ids, characters, whether it holds text or a separator), as the main process counts them."""
    counts = []
    with open(out, "wb") as f:
        for name, start, end in segments:
            ids, chars, started = 0, 0, False
            for piece, _ in dataset.stream_document(name, "utf-8", piece_chars, start=dataset.cut_offset(name, start),
                                                    end=dataset.cut_offset(name, end)):
                if piece == "":
                    continue
                started = True
                tokens = np.array([_worker["eot"]] if piece is None else _worker["encode"](piece), _worker["dtype"])
                tokens.tofile(f)
                ids += len(tokens)
                chars += len(dataset.EOT_TEXT) if piece is None else len(piece)
            counts.append((ids, chars, started))
    return counts


class _Done:
    """A result computed at once, standing in for a future when there is one process."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path)


def encode_corpus(files, writer, enc, *, vocab, use_tiktoken, combine, encoding, processes, progress=True,
                  piece_chars=dataset.PIECE_CHARS, task_bytes=TASK_BYTES):
    """Encodes `files` into `writer` as `dataset.load_dataset` would chunk them: the same chunks,
    in the same order, with the same ids.

    Args:
        files: From `dataset.dataset_files`.
        writer: A `shards.ShardWriter`.
        enc: The `encoder.Encoder` (its vocabulary is also read from `vocab` by each process).
        vocab: The directory of `enc`'s vocabulary files.
        use_tiktoken: Encode with tiktoken (see `choose_tokenizer`).
        combine: Characters of text that close a chunk; 0 gives one chunk per document.
        encoding: The text files' encoding.
        processes: Processes that encode at most; 1 encodes in this one, as does a corpus of
            one piece (starting processes costs more than it saves there).
        progress: Show bytes read on standard error (when it is a terminal).
        piece_chars: About how many characters each process is given at a time.
        task_bytes: Bytes of UTF-8 text in each task of the byte-range path (several processes).

    Raises:
        UserError: A file cannot be read or decoded, or an encoding process died.
    """
    dtype = writer.dtype
    total = sum(_size(name) for name in files)
    processes = max(1, min(processes, -(-total // piece_chars)))
    if processes > 1 and codecs.lookup(encoding).name == "utf-8":
        return _encode_in_ranges(files, writer, enc, vocab=vocab, use_tiktoken=use_tiktoken, combine=combine,
                                 processes=processes, progress=progress, piece_chars=piece_chars, task_bytes=task_bytes)
    pool = None
    if processes > 1:
        # Spawned, not forked: a fork of a process with threads (tqdm's, a caller's) can deadlock.
        pool = concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(vocab, use_tiktoken, dtype))
        submit = lambda piece: pool.submit(_encode_piece, piece)
    else:
        encode_here = piece_encoder(enc, use_tiktoken)
        submit = lambda piece: _Done(np.array(encode_here(piece), dtype=dtype))
    eot = _Done(np.array([enc.eot_token], dtype))
    queue = collections.deque()  # ("add", future) | ("whole", tokens) | ("end", None), in output order

    def put(kind, item=None):
        queue.append((kind, item))
        while len(queue) > PIECES_PER_PROCESS * processes:
            take()

    def take():
        kind, item = queue.popleft()
        if kind == "add":
            writer.add(item.result())
        elif kind == "whole":
            writer.add_chunk(item)
        else:
            writer.end_chunk()

    documents, chars = 0, 0
    try:
        with tqdm.tqdm(total=total, desc="encoding", unit="B", unit_scale=True,
                       disable=None if progress else True) as bar:
            for name in files:
                if shards.is_shard_dir(name) or name.lower().endswith(".npz"):
                    whole = (shards.read_shards(name, enc.n_vocab) if shards.is_shard_dir(name)
                             else dataset.load_npz(name, enc.n_vocab))
                    for tokens in whole:
                        put("whole", tokens)
                    bar.update(_size(name))
                    continue
                started, doc_chars = False, 0
                for piece, read in dataset.stream_document(name, encoding, piece_chars):
                    bar.update(read)
                    if piece == "":
                        continue
                    if not started and documents:
                        put("add", eot)  # the separator, once the document is known not to be empty
                    started = True
                    if piece is None:
                        put("add", eot)
                        doc_chars += len(dataset.EOT_TEXT)
                    else:
                        put("add", submit(piece))
                        doc_chars += len(piece)
                if not started:
                    continue
                documents += 1
                chars += doc_chars
                if chars >= combine:
                    put("end")
                    documents, chars = 0, 0
            if documents:
                put("end")
            while queue:
                take()
    except concurrent.futures.BrokenExecutor:
        raise cli.UserError("an encoding process ended abruptly (out of memory?): use fewer processes") from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _tasks(files, task_bytes):
    """The text files' bytes as (file, start, end) segments of at most `task_bytes`, grouped into
    tasks of about `task_bytes`; and how many segments each file has (an empty file has one)."""
    tasks, segments_of, size = [[]], {}, 0
    for name in files:
        if shards.is_shard_dir(name) or name.lower().endswith(".npz"):
            continue
        length = _size(name)
        bounds = list(range(0, length, task_bytes)) or [0]
        segments_of[name] = len(bounds)
        for start in bounds:
            end = min(start + task_bytes, length)
            if tasks[-1] and size + end - start > task_bytes:
                tasks.append([])
                size = 0
            tasks[-1].append((name, start, end))
            size += end - start
    return [t for t in tasks if t], segments_of


def _encode_in_ranges(files, writer, enc, *, vocab, use_tiktoken, combine, processes, progress, piece_chars,
                      task_bytes):
    """`encode_corpus` for UTF-8 text on several processes: each task's byte ranges are read,
    encoded and written by a process, and joined here, in order, into the same chunks."""
    tasks, segments_of = _tasks(files, task_bytes)
    scratch = f"{writer.temp_path}.ranges"
    os.makedirs(scratch)
    # Spawned, not forked: a fork of a process with threads (tqdm's, a caller's) can deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker,
                                                  initargs=(vocab, use_tiktoken, writer.dtype))
    outs = [os.path.join(scratch, f"task-{i:06d}") for i in range(len(tasks))]
    futures = [pool.submit(_encode_ranges, task, out, piece_chars) for task, out in zip(tasks, outs)]
    eot = np.array([enc.eot_token], writer.dtype)

    def segments():
        """(task, first id, ids, characters, started, bytes) of each segment, in order."""
        for i, (task, future) in enumerate(zip(tasks, futures)):
            first = 0
            for (_, start, end), (ids, chars, started) in zip(task, future.result()):
                yield i, first, ids, chars, started, end - start
                first += ids

    documents, chars, removed = 0, 0, 0
    pending = segments()
    try:
        with tqdm.tqdm(total=sum(_size(name) for name in files), desc="encoding", unit="B", unit_scale=True,
                       disable=None if progress else True) as bar:
            for name in files:
                if name not in segments_of:
                    whole = (shards.read_shards(name, enc.n_vocab) if shards.is_shard_dir(name)
                             else dataset.load_npz(name, enc.n_vocab))
                    for tokens in whole:
                        writer.add_chunk(tokens)
                    bar.update(_size(name))
                    continue
                started, doc_chars = False, 0
                for _ in range(segments_of[name]):
                    task, first, ids, part_chars, part_started, part_bytes = next(pending)
                    if part_started and not started and documents:
                        writer.add(eot)  # the separator, once the document is known not to be empty
                    started = started or part_started
                    if ids:
                        writer.add_file(outs[task], first, ids)
                    doc_chars += part_chars
                    for copied in range(removed, task):  # later segments are in this task's file or after
                        os.remove(outs[copied])
                    removed = max(removed, task)
                    bar.update(part_bytes)
                if not started:
                    continue
                documents += 1
                chars += doc_chars
                if chars >= combine:
                    writer.end_chunk()
                    documents, chars = 0, 0
            if documents:
                writer.end_chunk()
    except concurrent.futures.BrokenExecutor:
        raise cli.UserError("an encoding process ended abruptly (out of memory?): use fewer processes") from None
    finally:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(scratch, ignore_errors=True)


def write_npz(path, chunks):
    """Writes `chunks` as int32 arrays arr_0, arr_1, ... (the fork's layout, as np.savez_compressed
    writes them), one slice in memory at a time."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for i, chunk in enumerate(chunks):
            with archive.open(f"arr_{i}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False,
                                                         "shape": (len(chunk),)})
                for start in range(0, len(chunk), NPZ_SLICE):
                    f.write(np.asarray(chunk[start:start + NPZ_SLICE]).astype("<i4").tobytes())


def remove(path):
    """Removes a file or a directory tree, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_leftovers(parent, base):
    """Removes what killed runs writing `parent/base` left (temporary names with their pid)."""
    leftover = re.compile(re.escape(f".{base}.") + r"\d+\.tmp(\.[a-z.]+)?$")
    for name in os.listdir(parent):
        if leftover.match(name):
            remove(os.path.join(parent, name))


@cli.documented(
    "Encodes a text corpus to token shards (or an .npz) for train.py --dataset, then prints the number "
    "of chunks and tokens.\n\nFiles are documents, separated by the <|endoftext|> token; .npz files and shard "
    "directories in the input are copied as they are. The text streams through, so corpora larger than "
    "memory encode, on every core. The output is written whole or not at all.",
    in_text="The corpus: a text file, a directory (read recursively in sorted order, hidden files skipped) "
            "or a quoted glob such as 'data/*.txt'.",
    out="The output: a directory of .npy shards that train.py memory-maps, or, for a name ending in .npz, "
        "one .npz file (read whole into memory by train.py).",
    model_name="Model whose vocabulary to use; when models_dir has no such directory the bundled "
               "vocabulary is used, which all released GPT-2 sizes share.",
    combine="Documents are gathered into chunks of at least this many characters; 0 makes each "
            "document a chunk. Training windows never cross a chunk's end.",
    encoding="Encoding of the text files, a Python codec name (utf-8, latin-1, cp1252, ...).",
    processes="Processes that encode at once; 0 uses every core.",
    tokenizer="auto (tiktoken where it is installed, else builtin), tiktoken, or builtin (this project's "
              "encoder); both give the same ids.",
    shard_tokens="A shard file closes at the first chunk end past this many tokens.")
def encode(in_text: str, out: str, model_name: str = "124M", models_dir: str = "models", combine: int = 50000,
           encoding: str = "utf-8", processes: int = 0, tokenizer: str = "auto",
           shard_tokens: int = shards.SHARD_TOKENS):
    cli.check_whole("processes", processes, 0)
    cli.check_whole("shard_tokens", shard_tokens, 1)
    out = os.path.abspath(os.path.expanduser(str(out)))
    as_npz = out.lower().endswith(".npz")
    files = dataset.dataset_files(in_text)
    real_out = os.path.realpath(out)
    if any(os.path.commonpath([real_out, os.path.realpath(f)]) == real_out for f in files):
        raise cli.UserError(f"{out} is part of the input {in_text}: write the output elsewhere")
    if not as_npz and os.path.exists(out) and not shards.is_shard_dir(out) and (
            not os.path.isdir(out) or os.listdir(out)):
        raise cli.UserError(f"{out} exists and is not a shard directory: give a new name, or one ending in .npz")
    dataset.check_options(combine, encoding)
    enc = load_encoder(model_name, models_dir)
    use_tiktoken = choose_tokenizer(tokenizer, enc)
    processes = processes or len(os.sched_getaffinity(0))

    parent, base = os.path.split(out)
    temp = os.path.join(parent, f".{base}.{os.getpid()}.tmp")
    shard_dir = f"{temp}.shards" if as_npz else out
    writer = None
    try:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(parent, base)
        writer = shards.ShardWriter(shard_dir, f"{temp}.part", enc.n_vocab, shard_tokens)
        encode_corpus(files, writer, enc, vocab=vocab_dir(model_name, models_dir), use_tiktoken=use_tiktoken,
                      combine=combine, encoding=encoding, processes=processes)
        if not writer.chunk_count:
            raise cli.UserError(f"the dataset '{in_text}' holds no text (its files are empty): give files with text")
        chunk_count = writer.finish()
        if as_npz:
            write_npz(temp, shards.read_shards(shard_dir, enc.n_vocab))
            os.replace(temp, out)
    except OSError as e:
        raise cli.UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if writer is not None:
            writer.abort()
        if as_npz:
            remove(temp)
            remove(shard_dir)
    where = "" if as_npz else f" in {writer.shard_count} shard{'s' * (writer.shard_count != 1)}"
    print(f"wrote {chunk_count} chunk{'s' * (chunk_count != 1)}, {writer.tokens} tokens to {out}{where}")


if __name__ == "__main__":
    cli.run(encode)
