//! Smooth weighted round robin (nginx's algorithm) as a precomputed sequence.
//!
//! Workers share only a counter; each request claims the next position with
//! CAS and looks up the target at that position. Because the sequence is a
//! pure function of the weights, every worker computes the same one, and any
//! run of one period (`sum(weights) / gcd(weights)` positions) holds each
//! target exactly `weight / gcd` times: shares are exact for the proxy.

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One period of the smooth-WRR sequence of `weights` (target indices).
/// Targets with weight 0 never appear; all zero gives an empty sequence.
pub fn smooth_wrr(weights: &[u32]) -> Vec<u8> {
    let g = weights.iter().fold(0, |g, w| gcd(g, *w));
    if g == 0 {
        return Vec::new();
    }
    let reduced: Vec<i64> = weights.iter().map(|w| i64::from(w / g)).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; reduced.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&reduced) {
            *c += w;
        }
        // The highest current value wins; on a tie, the first target.
        let pick = current
            .iter()
            .zip(&reduced)
            .enumerate()
            .filter(|(_, (_, w))| **w > 0)
            .max_by(|(i, (a, _)), (j, (b, _))| a.cmp(b).then(j.cmp(i)))
            .map(|(i, _)| i);
        let Some(pick) = pick else { break };
        if let Some(c) = current.get_mut(pick) {
            *c -= total;
        }
        out.push(pick as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ninety_ten_is_smooth_and_exact() {
        let seq = smooth_wrr(&[90, 10]);
        assert_eq!(seq, vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(smooth_wrr(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr(&[0, 3]), vec![1]);
        assert!(smooth_wrr(&[0, 0]).is_empty());
    }

    proptest! {
        #[test]
        fn one_period_holds_each_target_weight_over_gcd_times(
            weights in proptest::collection::vec(0u32..200, 1..8)
        ) {
            let seq = smooth_wrr(&weights);
            let g = weights.iter().fold(0, |g, w| gcd(g, *w));
            for (i, w) in weights.iter().enumerate() {
                let n = seq.iter().filter(|t| usize::from(**t) == i).count() as u32;
                prop_assert_eq!(n, w.checked_div(g).unwrap_or(0));
            }
        }

        #[test]
        fn every_prefix_stays_within_one_of_the_ideal_share(
            weights in proptest::collection::vec(1u32..50, 1..6)
        ) {
            let seq = smooth_wrr(&weights);
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            for (n, t) in seq.iter().enumerate() {
                counts[usize::from(*t)] += 1;
                for (i, w) in weights.iter().enumerate() {
                    let ideal = f64::from(*w) * (n + 1) as f64 / f64::from(total);
                    prop_assert!((f64::from(counts[i]) - ideal).abs() < weights.len() as f64,
                        "prefix {} target {}: {} vs {}", n + 1, i, counts[i], ideal);
                }
            }
        }
    }
}
