//! The dev_ratio split: deterministic for a seed, different across seeds.

use llmtune_data::split::{permutation, SplitMix64};
use llmtune_data::split_dev;

#[test]
fn split_is_deterministic_and_seed_dependent() {
    let items: Vec<u32> = (0..1000).collect();
    let (t1, d1) = split_dev(items.clone(), 0.05, 42).unwrap();
    let (t2, d2) = split_dev(items.clone(), 0.05, 42).unwrap();
    assert_eq!((&t1, &d1), (&t2, &d2));
    assert_eq!(d1.len(), 50); // ceil(0.05 * 1000)
    assert_eq!(t1.len(), 950);
    let (_, d3) = split_dev(items.clone(), 0.05, 43).unwrap();
    assert_ne!(d1, d3);
    // A partition of the input.
    let mut all: Vec<u32> = t1.iter().chain(&d1).copied().collect();
    all.sort();
    assert_eq!(all, items);
    // ceil: 3 of 41 items at 5%.
    let (t, d) = split_dev((0..41).collect::<Vec<_>>(), 0.05, 1).unwrap();
    assert_eq!((t.len(), d.len()), (38, 3));
}

#[test]
fn zero_ratio_keeps_everything_in_order() {
    let (t, d) = split_dev(vec![3, 1, 2], 0.0, 42).unwrap();
    assert_eq!(t, vec![3, 1, 2]);
    assert!(d.is_empty());
}

#[test]
fn impossible_splits_are_errors() {
    assert_eq!(
        split_dev(vec![1], 0.5, 0).unwrap_err().to_string(),
        "invalid value for `dev_ratio`: 0.5 of 1 samples leaves 0 for training and 1 for evaluation; both need at least one"
    );
    assert!(split_dev(vec![1, 2], 1.0, 0).is_err());
    assert!(split_dev(vec![1, 2], -0.1, 0).is_err());
}

#[test]
fn splitmix64_reference_values_and_permutation() {
    // SplitMix64 seeded with 0 (reference sequence from Vigna's splitmix64.c).
    let mut r = SplitMix64::new(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    let p = permutation(10, 42);
    let mut s = p.clone();
    s.sort();
    assert_eq!(s, (0..10).collect::<Vec<_>>());
    assert_eq!(p, permutation(10, 42));
    assert_ne!(p, permutation(10, 7));
    // Bounded draws stay in range and hit every value.
    let mut seen = [false; 7];
    for _ in 0..1000 {
        seen[r.below(7) as usize] = true;
    }
    assert!(seen.iter().all(|&x| x));
}
