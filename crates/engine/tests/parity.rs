//! Parity with the official definitions: tensors written by tests/fixtures/make_fixtures.py
//! from the official SiT `models.py`, FlowTurbo's `models_assemble.py` (refiner and the
//! assembled H/P/R sampler) and diffusers' `AutoencoderKL`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flowgen_engine::models::autoencoder::{AutoencoderConfig, AutoencoderKl};
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::samplers::VelocityField;
use flowgen_engine::velocity::{Guidance, GuidedField, SitVelocity};
use flowgen_engine::weights::WeightsFile;
use flowgen_engine::TimeConvention;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn io(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn sit_config() -> SitConfig {
    SitConfig {
        input_size: 8,
        in_channels: 4,
        patch_size: 2,
        hidden_size: 32,
        depth: 2,
        num_heads: 4,
        mlp_ratio: 4.0,
        num_classes: 10,
        class_dropout_prob: 0.1,
        learn_sigma: true,
        in_channels_scale: 1,
    }
}

fn load_sit(file: &str) -> Sit {
    let cfg = sit_config();
    WeightsFile::open(&fixture(file)).unwrap().build(DType::F32, &Device::Cpu, |vb| Sit::new(&cfg, vb)).unwrap()
}

#[test]
fn sit_forward_matches_official_definition() {
    let io = io("sit_tiny_io.safetensors");
    let y = io["y"].to_dtype(DType::U32).unwrap();
    for file in ["sit_tiny.safetensors", "sit_tiny_nested.pt"] {
        let sit = load_sit(file);
        let out = sit.forward(&io["x"], &io["t"], &y).unwrap();
        assert_eq!(out.dims(), &[3, 4, 8, 8]);
        let diff = max_abs_diff(&out, &io["out"]);
        assert!(diff < 1e-4, "{file}: max |diff| = {diff}");
    }
}

#[test]
fn sit_guidance_matches_forward_with_cfg_on_channels_0_to_2() {
    let io = io("sit_tiny_io.safetensors");
    let model = SitVelocity { net: load_sit("sit_tiny.safetensors"), convention: TimeConvention::Sit };
    let labels: Vec<u32> = io["y"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let s: Vec<f64> = io["t"].to_vec1::<f32>().unwrap().iter().map(|&t| t as f64).collect();
    let guidance = Guidance { scale: 3.0, null_label: Some(10), channels: Some(vec![0, 1, 2]), interval: (0.0, 1.0) };
    let field = GuidedField::new(&model, &labels, guidance, &Device::Cpu).unwrap();
    let v = field.velocity(&io["x"], &s).unwrap();
    let diff = max_abs_diff(&v, &io["out_cfg"]);
    assert!(diff < 1e-4, "max |diff| = {diff}");
    // Channel 3 follows the conditional velocity exactly.
    let diff3 = max_abs_diff(&v.narrow(1, 3, 1).unwrap(), &io["out"].narrow(1, 3, 1).unwrap());
    assert!(diff3 < 1e-5, "{diff3}");
}

#[test]
fn fixed_pos_embed_matches_the_checkpoint_table() {
    let ckpt = WeightsFile::open(&fixture("sit_tiny.safetensors")).unwrap();
    let stored = ckpt.load("pos_embed", DType::F32, &Device::Cpu).unwrap();
    let ours = Sit::fixed_pos_embed(&sit_config(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&stored, &ours);
    assert!(diff < 1e-6, "{diff}");
}

fn vae_config() -> AutoencoderConfig {
    AutoencoderConfig {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 4,
        block_out_channels: vec![16, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        mid_block_add_attention: true,
        use_quant_conv: true,
        use_post_quant_conv: true,
    }
}

#[test]
fn autoencoder_matches_diffusers() {
    let io = io("vae_tiny_io.safetensors");
    let cfg = vae_config();
    let vae = WeightsFile::open(&fixture("vae_tiny.safetensors"))
        .unwrap()
        .build(DType::F32, &Device::Cpu, |vb| AutoencoderKl::new(&cfg, vb))
        .unwrap();
    let posterior = vae.encode(&io["image"]).unwrap();
    assert_eq!(posterior.mean.dims(), &[2, 4, 8, 8]);
    for (name, ours) in [("mean", &posterior.mean), ("logvar", &posterior.logvar)] {
        let diff = max_abs_diff(ours, &io[name]);
        assert!(diff < 1e-4, "{name}: {diff}");
    }
    let decoded = vae.decode(&io["z"]).unwrap();
    assert_eq!(decoded.dims(), &[2, 3, 16, 16]);
    let diff = max_abs_diff(&decoded, &io["decoded"]);
    assert!(diff < 1e-4, "decoded: {diff}");
}

#[test]
fn autoencoder_loads_legacy_attention_names() {
    // The original SD VAE uploads name the mid-block attention query/key/value/proj_attn.
    let tensors = candle_core::safetensors::load(fixture("vae_tiny.safetensors"), &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("to_q", "query")
                .replace("to_k", "key")
                .replace("to_v", "value")
                .replace("to_out.0", "proj_attn");
            (k, v)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let cfg = vae_config();
    let vae =
        WeightsFile::open(&path).unwrap().build(DType::F32, &Device::Cpu, |vb| AutoencoderKl::new(&cfg, vb)).unwrap();
    let io = io("vae_tiny_io.safetensors");
    let diff = max_abs_diff(&vae.decode(&io["z"]).unwrap(), &io["decoded"]);
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn sit_forward_flops_count_every_matrix_product_once() {
    // 16 tokens of width 32, patches of 4 channels x 2 x 2 in, 8 x 2 x 2 out, MLP 128, two blocks:
    // embed 16*16*32 + 256*32 + 32*32 = 17,408 multiply-adds; per block adaLN 32*192 + qkv
    // 16*32*96 + attention 2*16*16*32 + projection 16*32*32 + MLP 2*16*32*128 = 219,136; final
    // 32*64 + 16*32*32 = 18,432; two FLOPs per multiply-add.
    let macs = 17_408.0 + 2.0 * 219_136.0 + 18_432.0;
    assert_eq!(sit_config().forward_flops(), 2.0 * macs);
}

fn refiner_config() -> SitConfig {
    SitConfig { depth: 1, in_channels_scale: 2, ..sit_config() }
}

fn flowturbo_nets() -> (SitVelocity, SitVelocity) {
    let build = |file: &str, cfg: SitConfig| SitVelocity {
        net: WeightsFile::open(&fixture(file))
            .unwrap()
            .build(DType::F32, &Device::Cpu, |vb| Sit::new(&cfg, vb))
            .unwrap(),
        convention: TimeConvention::Sit,
    };
    let predictor = build("flowturbo_predictor_tiny.safetensors", sit_config());
    let refiner = build("flowturbo_refiner_tiny.safetensors", refiner_config());
    (predictor, refiner)
}

#[test]
fn flowturbo_refiner_forward_matches_the_release() {
    let io = io("flowturbo_tiny_io.safetensors");
    let (_, refiner) = flowturbo_nets();
    let y = io["y"].to_dtype(DType::U32).unwrap();
    let input = Tensor::cat(&[&io["x"], &io["v"]], 1).unwrap();
    let out = refiner.net.forward(&input, &io["t"], &y).unwrap();
    assert_eq!(out.dims(), &[3, 4, 8, 8], "learn_sigma: the first C of 2C outputs are kept");
    let diff = max_abs_diff(&out, &io["refiner_out"]);
    assert!(diff < 1e-4, "max |diff| = {diff}");
}

#[test]
fn flowturbo_plans_match_the_released_assembler() {
    use flowgen_engine::samplers::{Fields, Unobserved, REFINER_NETWORK};
    use flowgen_engine::{Sampler, Schedule};
    let io = io("flowturbo_tiny_io.safetensors");
    let (predictor, refiner) = flowturbo_nets();
    let labels: Vec<u32> = io["labels"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    // The release guides both networks at the same scale, on latent channels 0..2.
    let guidance = Guidance { scale: 1.5, null_label: Some(10), channels: Some(vec![0, 1, 2]), interval: (0.0, 1.0) };
    let main = GuidedField::new(&predictor, &labels, guidance.clone(), &Device::Cpu).unwrap();
    let refine = GuidedField::new(&refiner, &labels, guidance, &Device::Cpu).unwrap();
    let fields = Fields::main(&main).with(REFINER_NETWORK, &refine);
    for plan in ["H1P2R2", "H0P3R1", "H2P0R2"] {
        let sampler = Sampler::parse(&format!("flowturbo:{plan}")).unwrap();
        let steps = sampler.own_steps().unwrap();
        let grid = Schedule::uniform(steps).unwrap();
        let (x1, stats) = sampler.solve_with(&fields, io["x0"].clone(), &grid, &mut Unobserved).unwrap();
        let diff = max_abs_diff(&x1, &io[plan]);
        assert!(diff < 1e-4, "{plan}: max |diff| = {diff}");
        let Sampler::FlowTurbo(p) = sampler else { unreachable!() };
        assert_eq!(stats.nfe(), p.velocity_evaluations(), "{plan}");
        assert_eq!(stats.evaluations[REFINER_NETWORK], p.refiner_evaluations(), "{plan}");
    }
}

#[test]
fn refiner_forward_flops_count_the_doubled_patch_embedding() {
    let (sit, refiner) = (sit_config(), refiner_config());
    let tokens = 16.0;
    let patch_in = |c: usize| (c * 2 * 2) as f64;
    // A one-block SiT plus the patch embedding's extra input channels (tokens x 16 x 32 more MACs).
    let expected = SitConfig { depth: 1, ..sit }.forward_flops() + 2.0 * tokens * (patch_in(8) - patch_in(4)) * 32.0;
    assert!((refiner.forward_flops() - expected).abs() < 1e-6, "{} vs {expected}", refiner.forward_flops());
}
