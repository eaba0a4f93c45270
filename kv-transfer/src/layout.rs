//! The shape of a paged KV cache, as both ends of a transfer must agree on it. Per layer one
//! contiguous tensor `[num_blocks, 2, block_size, kv_heads, head_dim]`, layers one after the
//! other, so block `b` of layer `l` is one contiguous range at [`KvLayout::offset`]. A block on
//! the wire is every layer's range of that block, layer after layer ([`KvLayout::block_bytes`]).

use serde::{Deserialize, Serialize};

use crate::error::TransferError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// The cache's element type by name (`f32`, `bf16`, `f16`, `fp8_e4m3`).
    pub dtype: String,
    pub elem_bytes: usize,
    pub num_blocks: usize,
}

impl KvLayout {
    /// One block of one layer: K and V for `block_size` positions.
    pub fn layer_block_bytes(&self) -> usize {
        2 * self.block_size * self.num_kv_heads * self.head_dim * self.elem_bytes
    }

    /// One block over every layer: the unit `write_blocks` moves.
    pub fn block_bytes(&self) -> usize {
        self.layer_block_bytes() * self.num_layers
    }

    /// One layer's tensor.
    pub fn layer_bytes(&self) -> usize {
        self.layer_block_bytes() * self.num_blocks
    }

    /// The whole cache.
    pub fn total_bytes(&self) -> usize {
        self.layer_bytes() * self.num_layers
    }

    /// Where block `block` of layer `layer` starts in the cache's memory.
    pub fn offset(&self, layer: usize, block: usize) -> usize {
        layer * self.layer_bytes() + block * self.layer_block_bytes()
    }

    /// [`KvLayout::total_bytes`], refusing a layout with no bytes or one whose sizes overflow
    /// (a descriptor comes from another process; its numbers are not trusted to be sane). Once
    /// this passes, every offset and size above is computed without overflow.
    pub fn checked_total_bytes(&self) -> Result<usize, TransferError> {
        let total = [
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.elem_bytes,
            self.num_layers,
            self.num_blocks,
        ]
        .iter()
        .try_fold(2usize, |acc, &n| acc.checked_mul(n));
        match total {
            Some(0) => Err(TransferError::InvalidLayout {
                reason: format!("it holds no bytes ({self:?})"),
            }),
            Some(total) => Ok(total),
            None => Err(TransferError::InvalidLayout {
                reason: format!("its size overflows ({self:?})"),
            }),
        }
    }

    /// Whether blocks computed under `self` can be written into a cache of layout `theirs`:
    /// everything but the block count must match.
    pub fn check_compatible(&self, theirs: &KvLayout) -> Result<(), TransferError> {
        let fields: [(&'static str, String, String); 6] = [
            (
                "num_layers",
                self.num_layers.to_string(),
                theirs.num_layers.to_string(),
            ),
            (
                "num_kv_heads",
                self.num_kv_heads.to_string(),
                theirs.num_kv_heads.to_string(),
            ),
            (
                "head_dim",
                self.head_dim.to_string(),
                theirs.head_dim.to_string(),
            ),
            (
                "block_size",
                self.block_size.to_string(),
                theirs.block_size.to_string(),
            ),
            ("dtype", self.dtype.clone(), theirs.dtype.clone()),
            (
                "elem_bytes",
                self.elem_bytes.to_string(),
                theirs.elem_bytes.to_string(),
            ),
        ];
        for (field, ours, theirs) in fields {
            if ours != theirs {
                return Err(TransferError::LayoutMismatch {
                    field,
                    ours,
                    theirs,
                });
            }
        }
        Ok(())
    }

    /// Checks that `count` blocks may go to `dst_blocks`: one id each, every id in the cache.
    pub fn check_destinations(
        &self,
        dst_blocks: &[u32],
        count: usize,
    ) -> Result<(), TransferError> {
        if dst_blocks.len() != count {
            return Err(TransferError::BlockCount {
                ids: dst_blocks.len(),
                blocks: count,
            });
        }
        match dst_blocks
            .iter()
            .find(|&&id| id as usize >= self.num_blocks)
        {
            Some(&block) => Err(TransferError::NoSuchBlock {
                block,
                num_blocks: self.num_blocks,
            }),
            None => Ok(()),
        }
    }

    /// Checks a write of `blocks` into `dst_blocks` before any byte moves: the destinations,
    /// then each block's size.
    pub fn check_write(&self, dst_blocks: &[u32], blocks: &[Vec<u8>]) -> Result<(), TransferError> {
        self.check_destinations(dst_blocks, blocks.len())?;
        for (&id, data) in dst_blocks.iter().zip(blocks) {
            if data.len() != self.block_bytes() {
                return Err(TransferError::BlockSize {
                    block: id,
                    expected: self.block_bytes(),
                    got: data.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 3,
            num_kv_heads: 2,
            head_dim: 4,
            block_size: 8,
            dtype: "f32".into(),
            elem_bytes: 4,
            num_blocks: 5,
        }
    }

    #[test]
    fn offsets_follow_the_layer_major_tensor_layout() {
        let l = layout();
        assert_eq!(l.layer_block_bytes(), 2 * 8 * 2 * 4 * 4);
        assert_eq!(l.offset(0, 1), l.layer_block_bytes());
        assert_eq!(l.offset(1, 0), 5 * l.layer_block_bytes());
        assert_eq!(l.offset(2, 4) + l.layer_block_bytes(), l.total_bytes());
    }

    #[test]
    fn a_different_block_count_is_compatible_a_different_dtype_is_not() {
        let ours = layout();
        let more = KvLayout {
            num_blocks: 100,
            ..layout()
        };
        ours.check_compatible(&more).unwrap();
        let bf16 = KvLayout {
            dtype: "bf16".into(),
            elem_bytes: 2,
            ..layout()
        };
        let err = ours.check_compatible(&bf16).unwrap_err().to_string();
        assert!(
            err.contains("dtype") && err.contains("f32") && err.contains("bf16"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_or_overflowing_layout_is_refused() {
        assert_eq!(
            layout().checked_total_bytes().unwrap(),
            layout().total_bytes()
        );
        let empty = KvLayout {
            num_blocks: 0,
            ..layout()
        };
        assert!(empty
            .checked_total_bytes()
            .unwrap_err()
            .to_string()
            .contains("no bytes"));
        let huge = KvLayout {
            num_blocks: usize::MAX / 2,
            ..layout()
        };
        assert!(huge
            .checked_total_bytes()
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }

    #[test]
    fn a_write_past_the_cache_or_of_the_wrong_size_is_refused() {
        let l = layout();
        let ok = vec![0u8; l.block_bytes()];
        l.check_write(&[4], std::slice::from_ref(&ok)).unwrap();
        assert!(l.check_write(&[5], std::slice::from_ref(&ok)).is_err());
        assert!(l.check_write(&[0], &[vec![0u8; 3]]).is_err());
        assert!(l.check_write(&[0, 1], std::slice::from_ref(&ok)).is_err());
    }
}
