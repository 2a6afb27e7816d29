//! A fast, stable 64-bit hash for keys of shared-data tables.
//!
//! Every worker runs the same module, so "stable" only needs to hold within one
//! build. FNV-1a over the bytes, then the SplitMix64 finaliser so that low and
//! high bits are both well mixed (the table uses one part to pick a shard and
//! the whole value as a fingerprint). Not keyed: a client who knows the
//! function can aim keys at one shard, which only sends its own keys to the
//! overflow bucket sooner.

pub fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = KeyHasher::new();
    for part in parts {
        h.part(part);
    }
    h.finish()
}

/// Hashes a key given part by part (so callers need not join the parts).
#[derive(Debug, Clone)]
pub struct KeyHasher {
    h: u64,
    parts: u32,
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyHasher {
    pub fn new() -> Self {
        KeyHasher {
            h: 0xcbf2_9ce4_8422_2325,
            parts: 0,
        }
    }

    pub fn part(&mut self, bytes: &[u8]) {
        if self.parts > 0 {
            // A separator, and the part length below, so ["ab","c"] != ["a","bc"].
            self.h = (self.h ^ 0xff).wrapping_mul(0x100_0000_01b3);
        }
        for b in bytes {
            self.h = (self.h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        self.h = (self.h ^ bytes.len() as u64).wrapping_mul(0x100_0000_01b3);
        self.parts += 1;
    }

    pub fn finish(&self) -> u64 {
        mix(self.h)
    }
}

/// Also a `std::hash::Hasher`, for maps with short keys from bounded sets
/// (`HashMap<K, V, BuildHasherDefault<KeyHasher>>`), where SipHash's cost per
/// lookup buys nothing.
impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        KeyHasher::finish(self)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.part(bytes);
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_boundaries_matter() {
        assert_ne!(hash64(&[b"ab", b"c"]), hash64(&[b"a", b"bc"]));
        assert_ne!(hash64(&[b"", b""]), hash64(&[b""]));
        assert_eq!(hash64(&[b"x"]), hash64(&[b"x"]));
    }

    #[test]
    fn spreads_over_shards() {
        let mut counts = [0u32; 16];
        for i in 0..16_000u32 {
            counts[(hash64(&[&i.to_le_bytes()]) % 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
