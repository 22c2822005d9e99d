//! The scheduler without a model (vLLM `test_scheduler` style): fabricated sampled tokens.

use mlxd::request::{FinishReason, ImageSpan, RequestId};
use mlxd::scheduler::kv::BlockManager;
use mlxd::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput, Sequence, SequenceSpec};

const BLOCK: usize = 16;

fn scheduler(num_blocks: usize, budget: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            max_model_len: 1024,
        },
        BlockManager::new(num_blocks, BLOCK, true),
    )
}

fn seq(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Sequence {
    let spec = SequenceSpec {
        prompt,
        max_tokens,
        stop_tokens: vec![2],
        cache_salt: 0,
        reuse_cached_prefix: true,
        max_chunk: None,
        images: Vec::new(),
    };
    Sequence::new(RequestId(id), spec, BLOCK)
}

/// A sequence whose prompt holds an image's soft tokens (id 99) at `start..start + len`.
fn seq_with_image(id: u64, prompt_len: usize, start: usize, len: usize, digest: u64) -> Sequence {
    let mut prompt: Vec<u32> = (0..prompt_len as u32).map(|i| 3 + i % 50).collect();
    prompt[start..start + len].fill(99);
    let spec = SequenceSpec {
        prompt,
        max_tokens: 2,
        stop_tokens: vec![2],
        cache_salt: 0,
        reuse_cached_prefix: true,
        max_chunk: None,
        images: vec![ImageSpan { start, len, digest }],
    };
    Sequence::new(RequestId(id), spec, BLOCK)
}

/// One step where every sampling sequence samples `token`.
fn step(s: &mut Scheduler, token: u32) -> (SchedulerOutput, Vec<mlxd::scheduler::StepResult>) {
    let out = s.schedule();
    let sampled = vec![token; out.seqs.iter().filter(|x| x.sample).count()];
    let results = s.update(&out, &sampled);
    (out, results)
}

fn planned(out: &SchedulerOutput) -> Vec<(u64, usize, usize, bool)> {
    out.seqs
        .iter()
        .map(
            |ScheduledSeq {
                 id,
                 num_computed,
                 num_new,
                 sample,
             }| (id.0, *num_computed, *num_new, *sample),
        )
        .collect()
}

#[test]
fn chunked_prefill_respects_the_token_budget() {
    let mut s = scheduler(64, 32);
    s.add(seq(1, (0..100).map(|i| 3 + i % 50).collect(), 4), ());
    let mut plans = Vec::new();
    for _ in 0..4 {
        plans.push(planned(&step(&mut s, 7).0));
    }
    assert_eq!(
        plans,
        vec![
            vec![(1, 0, 32, false)],
            vec![(1, 32, 32, false)],
            vec![(1, 64, 32, false)],
            vec![(1, 96, 4, true)],
        ]
    );
}

#[test]
fn a_sequence_s_own_chunk_cap_splits_its_prompt_below_the_budget() {
    let mut s = scheduler(64, 32);
    let mut capped = seq(1, (0..20).map(|i| 3 + i % 50).collect(), 2);
    capped.max_chunk = 8;
    s.add(capped, ());
    s.add(seq(2, (0..12).map(|i| 3 + i % 40).collect(), 2), ());
    let plans: Vec<_> = (0..3).map(|_| planned(&step(&mut s, 7).0)).collect();
    assert_eq!(
        plans,
        [
            vec![(1, 0, 8, false), (2, 0, 12, true)],
            vec![(1, 8, 8, false), (2, 12, 1, true)],
            vec![(1, 16, 4, true)],
        ]
    );
}

#[test]
fn running_sequences_keep_decoding_while_a_long_prompt_is_chunked() {
    let mut s = scheduler(64, 32);
    s.add(seq(1, vec![5; 10], 50), ());
    step(&mut s, 7); // A's prefill
    s.add(seq(2, (0..100).map(|i| 3 + i % 50).collect(), 4), ());
    for i in 0..4 {
        let (out, results) = step(&mut s, 7);
        let plan = planned(&out);
        assert_eq!(plan[0], (1, 10 + i, 1, true), "A decodes one token every step");
        assert_eq!(
            plan[1].2,
            if i < 3 { 31 } else { 100 - 93 },
            "B gets the rest of the budget"
        );
        assert!(out.num_tokens() <= 32);
        assert_eq!(results[0].id, RequestId(1));
    }
}

#[test]
fn a_prefix_hit_reduces_the_work_and_never_covers_the_last_token() {
    let mut s = scheduler(64, 256);
    let prompt: Vec<u32> = (0..48).map(|i| 3 + i).collect();
    s.add(seq(1, prompt.clone(), 1), ());
    let (_, r) = step(&mut s, 9);
    assert_eq!(r[0].finished, Some(FinishReason::Length));
    // 48 tokens = 3 full blocks, but the last token must be recomputed: 2 blocks are shared,
    // and the third, free again, is taken over for its first 15 slots.
    s.add(seq(2, prompt.clone(), 1), ());
    let (out, _) = step(&mut s, 9);
    assert_eq!(planned(&out), vec![(2, 47, 1, true)]);
    // Recomputed, that block is cached again under the same hash.
    let mut longer = prompt;
    longer.extend([60, 61]);
    s.add(seq(3, longer, 1), ());
    let (out, _) = step(&mut s, 9);
    assert_eq!(planned(&out), vec![(3, 48, 2, true)]);
}

#[test]
fn preemption_frees_the_newest_and_it_completes_later() {
    // 4 usable blocks = 64 token slots; two sequences of 30 + 20 tokens cannot both grow.
    let mut s = scheduler(5, 256);
    s.add(seq(1, vec![5; 30], 20), ());
    s.add(seq(2, vec![6; 30], 20), ());
    let mut finished = Vec::new();
    let mut outputs: std::collections::HashMap<u64, usize> = Default::default();
    for _ in 0..200 {
        if !s.has_work() {
            break;
        }
        let (_, results) = step(&mut s, 7);
        for r in results {
            *outputs.entry(r.id.0).or_default() += 1;
            if r.finished.is_some() {
                finished.push(r.id.0);
            }
        }
    }
    assert_eq!(finished, vec![1, 2]);
    assert!(s.num_preemptions() > 0);
    assert_eq!(outputs[&1], 20);
    assert_eq!(outputs[&2], 20, "a preempted sequence loses no tokens");
    assert_eq!(s.blocks().pool().num_free(), 4);
}

#[test]
fn abort_frees_every_block_wherever_the_sequence_is() {
    let mut s = scheduler(16, 16);
    s.add(seq(1, vec![5; 40], 10), ());
    s.add(seq(2, vec![6; 40], 10), ());
    step(&mut s, 7);
    assert!(s.blocks().pool().num_free() < 15);
    s.abort(RequestId(1));
    s.abort(RequestId(2));
    assert!(!s.has_work());
    assert_eq!(s.blocks().pool().num_free(), 15);
}

#[test]
fn eos_and_length_stop_sequences() {
    let mut s = scheduler(16, 64);
    s.add(seq(1, vec![5; 4], 3), ());
    s.add(seq(2, vec![6; 4], 3), ());
    let (_, r) = step(&mut s, 9);
    assert!(r.iter().all(|x| x.finished.is_none()));
    let out = s.schedule();
    let r = s.update(&out, &[2, 9]);
    assert_eq!(r[0].finished, Some(FinishReason::Stop), "EOS id 2 stops");
    assert_eq!(r[1].finished, None);
    let (_, r) = step(&mut s, 9);
    assert_eq!(r[0].finished, Some(FinishReason::Length), "third token hits max_tokens");
}

#[test]
fn a_chunk_never_ends_inside_an_image() {
    // Budget 32, an image at 20..36: the first chunk stops before it, the second takes it
    // whole, the third the rest.
    let mut s = scheduler(64, 32);
    s.add(seq_with_image(1, 50, 20, 16, 7), ());
    let plans: Vec<_> = (0..3).map(|_| planned(&step(&mut s, 7).0)).collect();
    assert_eq!(
        plans,
        [vec![(1, 0, 20, false)], vec![(1, 20, 30, true)], vec![(1, 50, 1, true)]]
    );
    // Where a decode already takes some of the budget, an image that no longer fits waits.
    let mut s = scheduler(64, 20);
    s.add(seq(1, vec![5; 4], 50), ());
    step(&mut s, 7);
    s.add(seq_with_image(2, 40, 0, 20, 7), ());
    let (out, _) = step(&mut s, 7);
    assert_eq!(
        planned(&out),
        vec![(1, 4, 1, true)],
        "19 tokens of budget left: the image waits"
    );
}

#[test]
fn images_share_cached_kv_only_with_the_same_image() {
    let mut s = scheduler(64, 256);
    s.add(seq_with_image(1, 48, 8, 16, 7), ());
    step(&mut s, 9);
    step(&mut s, 9);
    // The same image again: everything but the last token comes from the cache.
    s.add(seq_with_image(2, 48, 8, 16, 7), ());
    let (out, _) = step(&mut s, 9);
    assert_eq!(planned(&out), vec![(2, 47, 1, true)]);
    step(&mut s, 9);
    // The same tokens with another image: only the text before the image (the first 8 slots
    // of block 0, a tail) is shared.
    s.add(seq_with_image(3, 48, 8, 16, 8), ());
    let (out, _) = step(&mut s, 9);
    assert_eq!(planned(&out), vec![(3, 8, 40, true)]);
}

#[test]
fn a_cached_prefix_ending_inside_an_image_resumes_with_the_whole_rest_of_it() {
    // Budget 40 so the first sequence's prompt goes in one step; its blocks 0 and 1 (tokens
    // 0..32) get cached, the image spans 24..40.
    let mut s = scheduler(64, 40);
    s.add(seq_with_image(1, 40, 24, 16, 7), ());
    step(&mut s, 9);
    step(&mut s, 9);
    // The same prompt longer: the hit ends at 32, inside the image; the chunk runs on to 40
    // and past it within the budget.
    let mut longer = seq_with_image(2, 60, 24, 16, 7);
    longer.max_chunk = 4;
    s.add(longer, ());
    let (out, _) = step(&mut s, 9);
    assert_eq!(
        planned(&out),
        vec![(2, 32, 8, false)],
        "a chunk cap of 4 yields to the image"
    );
}
