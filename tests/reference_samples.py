"""One sample built the way each reference's Dataset.__getitem__ builds it, from the package's
own id and mask rules: what the batched, cached data path (rows, token_cache) is checked
against, and the per-sample loss loop of the eval tests."""

from collections.abc import Sequence

import numpy as np

from minimind_jax.data import minimind3, samples


def minimind2_pretrain_sample(tokenizer, text: str, max_seq_len: int):
    """MiniMind2's pretrain sample of `text`: (X, Y, loss_mask), int64 [max_seq_len - 1]."""
    ids_list = samples.pretrain_ids_batch(tokenizer, [samples.pretrain_text({"text": text})],
                                          max_seq_len)
    row = samples.pad_rows(ids_list, max_seq_len, tokenizer.pad_id)[0]
    return samples.shift(row, (row != tokenizer.pad_id).astype(np.int64))


def minimind2_sft_sample(tokenizer, conversations: Sequence[dict], max_seq_len: int):
    """MiniMind2's SFT sample of `conversations` ([{"role", "content"}, ...]):
    (X, Y, loss_mask), int64 [max_seq_len - 1]; only assistant replies are supervised."""
    contents = samples.conversation_contents(list(conversations))
    row = samples.pad_rows(samples.sft_ids_batch(tokenizer, [contents], max_seq_len),
                           max_seq_len, tokenizer.pad_id)[0]
    return samples.shift(row, samples.sft_loss_mask(row, *samples.sft_mask_markers(tokenizer)))


def minimind3_pretrain_sample(tokenizer, text: str, max_seq_len: int):
    """minimind-3's PretrainDataset item: (input_ids, labels), int64 [max_seq_len]."""
    row = samples.pad_rows(minimind3.pretrain_ids_batch(tokenizer, [text], max_seq_len),
                           max_seq_len, tokenizer.pad_id)[0]
    return row, np.where(row == tokenizer.pad_id, -100, row)


def minimind3_sft_sample(tokenizer, record, max_seq_len: int, system_idx: int = -1,
                         stripped: bool = False):
    """minimind-3's SFTDataset item for given draws: (input_ids, labels), int64
    [max_seq_len]."""
    slots = minimind3.sft_ids_batch(tokenizer, [minimind3.sft_messages(record)], None)
    ids = minimind3.variant_ids(slots, minimind3.system_block_ids(tokenizer), system_idx,
                                stripped)[:max_seq_len]
    row = samples.pad_rows([ids], max_seq_len, tokenizer.pad_id)[0]
    mask = samples.sft_loss_mask(row, *minimind3.sft_markers(tokenizer), offset=0)
    return row, np.where(mask > 0, row, -100)
