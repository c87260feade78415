use serde::{Deserialize, Serialize};

/// A config value diffusers accepts either once for all blocks or per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// The same value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for each of `n` blocks; `None` if a per-block list has the wrong length.
    pub fn per_block(&self, n: usize) -> Option<Vec<T>> {
        match self {
            Self::One(v) => Some(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Some(v.clone()),
            Self::Many(_) => None,
        }
    }
}
