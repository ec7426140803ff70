"""lag_ds's tokenizer (``lag_ds.data.tokenizer.Ul2Tokenizer``) for Hugging Face, exactly.

Why a class of its own: lag_ds encodes text with the SentencePiece library itself. The
``tokenizers`` re-implementation that ``AutoTokenizer`` builds from a ``.model`` file (and the
``tokenizer.json`` shipped beside this file) agrees almost always, but breaks ties between
equal-score segmentations differently (e.g. some long runs of spaces: ``[12 spaces, 1, 1]`` vs
``[1, 1, 12 spaces]``), so a model would see segmentations it was not trained on. This class
calls ``sentencepiece`` exactly as lag_ds does -- same ids for every text -- and decodes runs of
pieces with SentencePiece too (byte-fallback pieces, leading spaces). The UL2 specials
(``[SEP]``, mode tokens, ``<extra_id_N>`` sentinels) are added tokens above the pieces, with
lag_ds's ids. Loaded by ``AutoTokenizer.from_pretrained(path, trust_remote_code=True)``.
"""

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class LagDSTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, **kwargs):
        kwargs["legacy"] = True  # encode the text as given: SentencePiece adds its dummy prefix
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("add_bos_token", False)
        kwargs.setdefault("add_eos_token", False)
        super().__init__(vocab_file=vocab_file, **kwargs)

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens):
        """SentencePiece decodes each run of pieces; added tokens (ids above the pieces) print as
        their names, as ``Ul2Tokenizer.decode`` does."""
        pieces = self.sp_model.get_piece_size()
        out, run = [], []
        for token in tokens:
            index = self.added_tokens_encoder.get(token)
            if index is not None and index >= pieces:
                if run:
                    out.append(self.sp_model.decode_pieces(run))
                    run = []
                out.append(token)
            else:
                run.append(token)
        if run:
            out.append(self.sp_model.decode_pieces(run))
        return "".join(out)


__all__ = ["LagDSTokenizer"]
