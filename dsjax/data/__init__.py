"""Training data: embedded corpus, tokenizers, text/JSONL/ArrayRecord sources, and a Grain
pipeline that packs documents into fixed-length rows with segment ids."""

from dsjax.data.corpus import default_documents
from dsjax.data.packing import unigram_entropy
from dsjax.data.pipeline import DataPipeline, TrainIterator, build_data
from dsjax.data.sources import Document, load_documents
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer", "DataPipeline", "Document", "HFTokenizer", "Tokenizer", "TrainIterator",
    "build_data", "default_documents", "load_documents", "make_tokenizer", "unigram_entropy",
]
