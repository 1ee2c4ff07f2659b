//! Blockwise Flow Matching: parity with the official `bfm.py` and `flow_matching.py` (tensors
//! written by tests/fixtures/make_fixtures.py --bfm-dir), segment dispatch at the boundaries,
//! mixed-segment batches, and the 2-D RoPE tables against a hand-computed case.

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use flowgen_engine::models::blockwise::{rope_tables, Blockwise, BlockwiseConfig};
use flowgen_engine::samplers::{Sampler, Unobserved};
use flowgen_engine::schedule::Schedule;
use flowgen_engine::velocity::{BlockwiseVelocity, Guidance, GuidedField};
use flowgen_engine::weights::WeightsFile;
use flowgen_engine::TimeConvention;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn io() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("blockwise_tiny_io.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The fixture's configuration (make_fixtures.py `blockwise_fixtures`).
fn tiny_config() -> BlockwiseConfig {
    BlockwiseConfig {
        input_size: 8,
        in_channels: 4,
        patch_size: 2,
        hidden_size: 32,
        num_heads: 2,
        mlp_ratio: 4.0,
        num_classes: 1000,
        class_dropout_prob: 0.1,
        learn_sigma: false,
        segments: 3,
        segment_depth: 2,
        feature_alignment_depth: 2,
        frn_depth: 1,
        adaln_lora_dim: 8,
        dim_projection: 12,
        projection_hidden: 24,
        rope_theta: 10000.0,
        abs_pos_embed: false,
    }
}

fn load() -> Blockwise {
    let cfg = tiny_config();
    WeightsFile::open(&fixture("blockwise_tiny.safetensors"))
        .unwrap()
        .build(DType::F32, &Device::Cpu, |vb| Blockwise::new(&cfg, vb))
        .unwrap()
}

fn labels(io: &std::collections::HashMap<String, Tensor>, key: &str) -> Tensor {
    io[key].to_dtype(DType::U32).unwrap()
}

#[test]
fn every_segment_trunk_and_projection_match_the_official_forward() {
    let io = io();
    let net = load();
    let y = labels(&io, "y");
    let inputs = net.step_inputs(&io["x"], &io["t"], &y).unwrap();
    let features = net.trunk(&inputs).unwrap();
    let diff = max_abs_diff(&features, &io["features"]);
    assert!(diff < 1e-4, "trunk features: max |diff| = {diff}");
    let diff = max_abs_diff(&net.project(&features).unwrap(), &io["projection"]);
    assert!(diff < 1e-4, "projection head: max |diff| = {diff}");
    for segment in 0..3 {
        let out = net.forward_segment(&io["x"], &io["t"], &y, segment).unwrap();
        assert_eq!(out.dims(), &[4, 4, 8, 8]);
        let diff = max_abs_diff(&out, &io[&format!("out_segment{segment}")]);
        assert!(diff < 1e-4, "segment {segment}: max |diff| = {diff}");
    }
}

#[test]
fn feature_residual_approximation_matches_the_official_frn_path() {
    let io = io();
    let net = load();
    let y = labels(&io, "y");
    let anchor = net.trunk(&net.step_inputs(&io["x"], &io["t"], &y).unwrap()).unwrap();
    let inputs = net.step_inputs(&io["x_later"], &io["t_later"], &y).unwrap();
    let coeff = io["coeff"].reshape((4, 1, 1)).unwrap();
    let features = (anchor + net.frn_residual(&inputs).unwrap().broadcast_mul(&coeff).unwrap()).unwrap();
    let out = net.velocity_head(&inputs, &features, 1).unwrap();
    let diff = max_abs_diff(&out, &io["out_fra"]);
    assert!(diff < 1e-4, "FRA: max |diff| = {diff}");
}

#[test]
fn euler_on_the_engine_grid_reproduces_the_released_ode_sampler() {
    // The engine integrates s = 1 - t with u = -v; Euler on 6 uniform steps visits exactly the
    // released sampler's per-segment grids (3 segments x 2 steps), guidance 2 on all channels.
    let io = io();
    let model = BlockwiseVelocity { net: load(), convention: TimeConvention::Lfm };
    let labels: Vec<u32> = labels(&io, "labels").to_vec1().unwrap();
    let guidance = Guidance { scale: 2.0, null_label: Some(1000), channels: None, interval: (0.0, 1.0) };
    let field = GuidedField::new(&model, &labels, guidance, &Device::Cpu).unwrap();
    let schedule = Schedule::uniform(6).unwrap();
    let (x, stats) = Sampler::Euler.solve(&field, io["noise"].clone(), &schedule, &mut Unobserved).unwrap();
    assert_eq!(stats.nfe(), 6);
    let diff = max_abs_diff(&x, &io["sample_ode"]);
    assert!(diff < 1e-4, "sample_ode: max |diff| = {diff}");
}

#[test]
fn segment_dispatch_at_the_boundaries() {
    let cfg = BlockwiseConfig { segments: 6, ..tiny_config() };
    // t = 1 (noise) is segment 0, t = 0 (data) the last; a segment's start time belongs to it.
    assert_eq!(cfg.segment_of(1.0), 0);
    assert_eq!(cfg.segment_of(0.0), 5);
    for s in 0..6 {
        let (start, end) = cfg.segment_bounds(s);
        assert_eq!(cfg.segment_of(start), s, "start of segment {s}");
        // The start time as the network receives it: rounded to f32.
        assert_eq!(cfg.segment_of(start as f32 as f64), s, "f32 start of segment {s}");
        assert_eq!(cfg.segment_of(end + 1e-4), s, "just before the end of segment {s}");
        assert_eq!(cfg.segment_of((start + end) / 2.0), s);
    }
    assert_eq!(cfg.segment_of(1.0 - 1.0 / 6.0 - 1e-4), 1);
    // Out-of-range times clamp to the end segments.
    assert_eq!(cfg.segment_of(1.5), 0);
    assert_eq!(cfg.segment_of(-0.5), 5);
}

#[test]
fn a_batch_spanning_segments_equals_each_row_run_alone() {
    let io = io();
    let net = load();
    let y = labels(&io, "y");
    // Rows in segments 0, 0, 1, 2 (t = 1, 0.9, 0.5, 0.1 over 3 segments).
    let mixed = net.forward(&io["x"], &io["t"], &y).unwrap();
    let segments = [0, 0, 1, 2];
    for (row, &segment) in segments.iter().enumerate() {
        let x = io["x"].narrow(0, row, 1).unwrap();
        let t = io["t"].narrow(0, row, 1).unwrap();
        let alone = net.forward_segment(&x, &t, &y.narrow(0, row, 1).unwrap(), segment).unwrap();
        let diff = max_abs_diff(&mixed.i(row).unwrap(), &alone.i(0).unwrap());
        assert!(diff < 1e-5, "row {row}: max |diff| = {diff}");
        let official = io[&format!("out_segment{segment}")].i(row).unwrap();
        assert!(max_abs_diff(&mixed.i(row).unwrap(), &official) < 1e-4, "row {row} against the fixture");
    }
}

#[test]
fn rope_tables_rotate_rows_then_columns_in_interleaved_pairs() {
    // grid 2, head dim 8, theta 100: frequencies 1 and 100^(-1/2) = 0.1; pairs 0-1 follow the
    // row, pairs 2-3 the column. Token 2 is row 1, column 0; token 1 is row 0, column 1.
    let (cos, sin) = rope_tables(2, 8, 100.0, &Device::Cpu).unwrap();
    assert_eq!(cos.dims(), &[4, 4]);
    let cos: Vec<Vec<f32>> = cos.to_vec2().unwrap();
    let sin: Vec<Vec<f32>> = sin.to_vec2().unwrap();
    let close = |a: &[f32], b: &[f64]| a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-6);
    assert!(close(&sin[0], &[0.0, 0.0, 0.0, 0.0]));
    assert!(close(&sin[2], &[1f64.sin(), 0.1f64.sin(), 0.0, 0.0]), "{:?}", sin[2]);
    assert!(close(&cos[2], &[1f64.cos(), 0.1f64.cos(), 1.0, 1.0]), "{:?}", cos[2]);
    assert!(close(&sin[1], &[0.0, 0.0, 1f64.sin(), 0.1f64.sin()]), "{:?}", sin[1]);
    assert!(close(&sin[3], &[1f64.sin(), 0.1f64.sin(), 1f64.sin(), 0.1f64.sin()]));

    // Rotating (1, 0) in pair 0 of token 2 by angle 1 gives (cos 1, sin 1), as the official
    // q * cos + rotate_half(q) * sin with rotate_half(x0, x1) = (-x1, x0).
    let q = Tensor::from_vec(
        (0..4).flat_map(|_| [1f32, 0., 0., 2., 0., 0., 0., 0.]).collect::<Vec<_>>(),
        (1, 1, 4, 8),
        &Device::Cpu,
    )
    .unwrap();
    let (c, s) = rope_tables(2, 8, 100.0, &Device::Cpu).unwrap();
    let rotated: Vec<f32> = candle_nn::rotary_emb::rope_i(&q, &c, &s).unwrap().i((0, 0, 2)).unwrap().to_vec1().unwrap();
    let expected = [1f64.cos(), 1f64.sin(), -2.0 * 0.1f64.sin(), 2.0 * 0.1f64.cos(), 0.0, 0.0, 0.0, 0.0];
    assert!(close(&rotated, &expected), "{rotated:?}");
}

#[test]
fn part_flops_add_up_to_a_forward() {
    let cfg = tiny_config();
    let f = cfg.flops();
    assert!(f.trunk > 0.0 && f.segment > 0.0 && f.frn > 0.0);
    assert_eq!(cfg.forward_flops(), f.trunk + f.segment);
    // Without an FRN its part is free; the trunk grows linearly with its depth.
    assert_eq!(BlockwiseConfig { frn_depth: 0, ..cfg.clone() }.flops().frn, 0.0);
    let deeper = BlockwiseConfig { feature_alignment_depth: 4, ..cfg.clone() }.flops().trunk;
    let (n, d, r) = (16.0, 32.0, 8.0);
    let block = 2.0 * (d * r + r * 6.0 * d + n * d * 3.0 * d + 2.0 * n * n * d + n * d * d + 2.0 * n * d * 128.0);
    assert!((deeper - f.trunk - 2.0 * block).abs() < 1e-6, "{deeper} vs {} + 2 x {block}", f.trunk);
}

#[test]
fn fra_reproduces_the_released_frn_sampler() {
    // 3 segments x 2 Euler steps, guidance 2: the trunk runs at each segment's first step and
    // the FRN approximates it at the second, as `sample_ode_frn`.
    let io = io();
    let model = BlockwiseVelocity { net: load(), convention: TimeConvention::Lfm };
    let labels: Vec<u32> = labels(&io, "labels").to_vec1().unwrap();
    let guidance = Guidance { scale: 2.0, null_label: Some(1000), channels: None, interval: (0.0, 1.0) };
    let field = GuidedField::new(&model, &labels, guidance, &Device::Cpu).unwrap();
    let schedule = Schedule::uniform(6).unwrap();
    let (x, stats) = Sampler::Fra.solve(&field, io["noise"].clone(), &schedule, &mut Unobserved).unwrap();
    let diff = max_abs_diff(&x, &io["sample_ode_frn"]);
    assert!(diff < 1e-4, "sample_ode_frn: max |diff| = {diff}");
    assert_eq!((stats.evaluations["velocity"], stats.evaluations["frn"], stats.steps), (3, 3, 6));
    // And it is not the plain sampler's result: the FRN path was taken.
    assert!(max_abs_diff(&x, &io["sample_ode"]) > 1e-3);
}

#[test]
fn fra_with_a_zero_frn_reuses_the_anchor_within_each_segment() {
    // Zero the shared patch embedding of the trunk and the FRN, and the FRN's modulations: the
    // FRN's residual is then exactly 0 and the trunk's features depend on (t, y) only, so FRA
    // must equal a loop that keeps each segment's first-step features.
    let cfg = tiny_config();
    let mut tensors = candle_core::safetensors::load(fixture("blockwise_tiny.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.starts_with("representation_x_embedder") || (name.starts_with("frn_blocks") && name.contains("adaLN")) {
            *t = t.zeros_like().unwrap();
        }
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let net = Blockwise::new(&cfg, vb).unwrap();
    let io = io();
    let y = labels(&io, "labels");
    let x0 = io["noise"].clone();

    // By hand: Euler in the engine frame (s = 1 - t, u = -v), anchor at each segment's start.
    let mut x = x0.clone();
    let mut anchor = None;
    for step in 0..6 {
        let (s0, s1) = (step as f64 / 6.0, (step + 1) as f64 / 6.0);
        let t = Tensor::from_vec(vec![(1.0 - s0) as f32; 2], 2, &Device::Cpu).unwrap();
        let inputs = net.step_inputs(&x, &t, &y).unwrap();
        if step % 2 == 0 {
            anchor = Some(net.trunk(&inputs).unwrap());
        }
        let v = net.velocity_head(&inputs, anchor.as_ref().unwrap(), step / 2).unwrap();
        x = (x - (v * (s1 - s0)).unwrap()).unwrap();
    }
    let model = BlockwiseVelocity { net, convention: TimeConvention::Lfm };
    let field = GuidedField::new(&model, &y.to_vec1::<u32>().unwrap(), Guidance::none(), &Device::Cpu).unwrap();
    let (fra, stats) = Sampler::Fra.solve(&field, x0, &Schedule::uniform(6).unwrap(), &mut Unobserved).unwrap();
    let diff = max_abs_diff(&fra, &x);
    assert!(diff < 1e-5, "FRA with a zero FRN vs anchor reuse: max |diff| = {diff}");
    assert_eq!(stats.evaluations["frn"], 3);
}

#[test]
fn a_blockwise_model_directory_serves_fixed_step_samplers_and_fra_with_their_costs() {
    use flowgen_engine::config::NetworkSection;
    use flowgen_engine::random_model::{tiny_latent_config, write_random_model};
    use flowgen_engine::{ImageInputs, NetworkArch, Pipeline, ScheduleAccess, SettingsRequest};
    let net = BlockwiseConfig {
        input_size: 7,
        patch_size: 1,
        num_classes: 10,
        segments: 4,
        segment_depth: 1,
        feature_alignment_depth: 2,
        frn_depth: 1,
        dim_projection: 0,
        ..tiny_config()
    };
    let mut config = tiny_latent_config("tiny-blockwise");
    config.network = NetworkSection {
        weights: "velocity.safetensors".into(),
        convention: TimeConvention::Lfm,
        arch: NetworkArch::Blockwise(net.clone()),
    };
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &config, 11).unwrap();
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    let cfg = pipeline.config();
    let parts = net.flops();
    assert_eq!(cfg.network_flops("velocity"), Some(parts.trunk + parts.segment));
    assert_eq!(cfg.network_flops("frn"), Some(parts.segment + parts.frn));
    let inputs = ImageInputs::cycle(&[1, 7], 2, 0);
    let run = |sampler: &str, steps: usize| {
        let request = SettingsRequest { sampler: Some(sampler.into()), steps: Some(steps), ..Default::default() };
        let settings = cfg.solve_settings(&request, ScheduleAccess::Named).unwrap();
        pipeline.generate(&settings, &inputs, &mut Unobserved).unwrap()
    };
    // Heun's second evaluation of a step lands in the next segment at segment ends: rows are
    // dispatched by their own time, whatever the sampler.
    for (sampler, nfe) in [("euler", 8), ("heun", 16), ("midpoint", 16)] {
        let out = run(sampler, 8);
        assert_eq!((out.images.len(), out.stats.nfe()), (2, nfe), "{sampler}");
    }
    // FRA on 8 steps over 4 segments: the trunk at 4 of them, the FRN at the other 4.
    let out = run("fra", 8);
    assert_eq!((out.stats.evaluations["velocity"], out.stats.evaluations["frn"]), (4, 4));
    let counts = out.stats.evaluations.iter().map(|(k, &n)| (k.as_str(), n as f64));
    let fra_flops = cfg.solve_flops(counts, true);
    let full_flops = cfg.solve_flops([("velocity", 8.0)], true);
    let saved = 2.0 * 4.0 * (parts.trunk - parts.frn);
    assert!((full_flops - fra_flops - saved).abs() < 1e-3, "{full_flops} - {fra_flops} != {saved}");
    // Models without an FRN refuse FRA by name.
    let sit = tiny_latent_config("tiny-sit");
    let err = sit.check_networks(&Sampler::Fra).unwrap_err().to_string();
    assert!(err.contains("fra") && err.contains("FRN"), "{err}");
}

#[test]
fn only_the_optional_absolute_table_tells_tokens_of_a_constant_state_apart() {
    // With RoPE alone, a constant state gives every token the same value vector, so attention
    // (whatever its weights) and every block keep the tokens identical; the absolute table
    // breaks that symmetry.
    let x = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
    let y = Tensor::new(&[3u32], &Device::Cpu).unwrap();
    let spread = |abs_pos_embed: bool| {
        let cfg = BlockwiseConfig { abs_pos_embed, ..tiny_config() };
        let (vb, _) = flowgen_engine::random_model::random_var_builder(1, &Device::Cpu);
        let net = Blockwise::new(&cfg, vb).unwrap();
        let features = net.trunk(&net.step_inputs(&x, &t, &y).unwrap()).unwrap();
        max_abs_diff(&features.i((0, 0)).unwrap(), &features.i((0, 9)).unwrap())
    };
    assert!(spread(false) < 1e-5, "{}", spread(false));
    assert!(spread(true) > 1e-3, "{}", spread(true));
}
