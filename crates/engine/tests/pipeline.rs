//! Shapes and determinism with random weights; loading and its errors.

use std::collections::HashMap;
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use flowgen_engine::models::autoencoder::AutoencoderKl;
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::random_model::{random_var_builder, tiny_latent_config, write_random_model};
use flowgen_engine::samplers::{Dopri5Options, Unobserved};
use flowgen_engine::velocity::SitVelocity;
use flowgen_engine::weights::{save_safetensors, WeightsFile};
use flowgen_engine::{
    EngineHandle, Error, GenerationRequest, ImageInputs, ModelConfig, NetworkArch, Pipeline, Result, Sampler,
    ScheduleSpec, SolveSettings, StepReport, TimeConvention, VelocityModel,
};

fn tiny_model_dir() -> (tempfile::TempDir, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_latent_config("test");
    write_random_model(dir.path(), &cfg, 42).unwrap();
    (dir, cfg)
}

fn settings(sampler: Sampler, steps: usize) -> SolveSettings {
    SolveSettings { sampler, steps, schedule: ScheduleSpec::Uniform, guidance: 2.0, guidance_interval: (0.0, 1.0) }
}

fn inputs(n: usize) -> ImageInputs {
    ImageInputs { labels: (0..n as u32).map(|i| i % 10).collect(), seeds: (0..n as u64).map(|i| 100 + i).collect() }
}

fn sit_of(cfg: &ModelConfig) -> SitConfig {
    let NetworkArch::Sit(sit) = &cfg.network.arch else { panic!("a sit network") };
    sit.clone()
}

#[test]
fn sit_shapes_with_patches_and_learn_sigma() {
    let cfg = SitConfig {
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
    };
    let (vb, _) = random_var_builder(0, &Device::Cpu);
    let sit = Sit::new(&cfg, vb).unwrap();
    let x = Tensor::randn(0f32, 1., (5, 4, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.0f32, 0.25, 0.5, 0.75, 1.0], &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3, 10], &Device::Cpu).unwrap();
    assert_eq!(sit.forward_full(&x, &t, &y).unwrap().dims(), &[5, 8, 8, 8]);
    assert_eq!(sit.forward(&x, &t, &y).unwrap().dims(), &[5, 4, 8, 8]);
}

#[test]
fn autoencoder_shapes_28_to_7() {
    let cfg = tiny_latent_config("t").autoencoder.unwrap().arch;
    let (vb, _) = random_var_builder(0, &Device::Cpu);
    let ae = AutoencoderKl::new(&cfg, vb).unwrap();
    let x = Tensor::randn(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
    let posterior = ae.encode(&x).unwrap();
    assert_eq!(posterior.mean.dims(), &[3, 4, 7, 7]);
    assert_eq!(posterior.sample().unwrap().dims(), &[3, 4, 7, 7]);
    assert_eq!(posterior.kl().unwrap().dims(), &[3]);
    assert_eq!(ae.decode(&posterior.mean).unwrap().dims(), &[3, 1, 28, 28]);
}

#[test]
fn save_load_round_trip_gives_the_same_network() {
    let cfg = sit_of(&tiny_latent_config("t"));
    let (vb, created) = random_var_builder(3, &Device::Cpu);
    let original = Sit::new(&cfg, vb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.safetensors");
    flowgen_engine::random_model::save_sit_weights(&cfg, &created.lock().unwrap(), &path).unwrap();
    let loaded = WeightsFile::open(&path).unwrap().build(DType::F32, &Device::Cpu, |vb| Sit::new(&cfg, vb)).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 4, 7, 7), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.1f32, 0.9], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 7], &Device::Cpu).unwrap();
    let a = original.forward(&x, &t, &y).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = loaded.forward(&x, &t, &y).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
}

#[test]
fn an_image_does_not_depend_on_its_batch() {
    let (dir, _) = tiny_model_dir();
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    for sampler in [Sampler::Heun, Sampler::Dopri5(Dopri5Options { rtol: 1e-4, atol: 1e-4, max_nfe: 2000 })] {
        let (shared, batch) = (settings(sampler.clone(), 4), inputs(16));
        let all = pipeline.generate(&shared, &batch, &mut Unobserved).unwrap();
        for i in [0usize, 7, 15] {
            let one = pipeline.generate(&shared, &batch.slice(i..i + 1), &mut Unobserved).unwrap();
            let a = one.state.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = all.state.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            // CPU matmul kernels round differently for different batch sizes (~1e-6); an
            // adaptive solver may then pick slightly different steps, within its tolerance.
            let allowed = if sampler.is_adaptive() { 1e-3 } else { 1e-5 };
            assert!(diff < allowed, "{}: image {i} differs by {diff} between batch sizes 1 and 16", sampler.name());
            let pixel_diff =
                one.images[0].pixels.iter().zip(&all.images[i].pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(pixel_diff <= 1, "{}: image {i} pixels differ by {pixel_diff}", sampler.name());
            if !sampler.is_adaptive() {
                assert_eq!(one.stats.per_sample_nfe[0], all.stats.per_sample_nfe[i]);
            }
        }
    }
}

#[test]
fn generation_is_deterministic_and_seed_dependent() {
    let (dir, _) = tiny_model_dir();
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    let (shared, images) = (settings(Sampler::Euler, 3), inputs(3));
    let a = pipeline.generate(&shared, &images, &mut Unobserved).unwrap();
    let b = pipeline.generate(&shared, &images, &mut Unobserved).unwrap();
    assert_eq!(a.images, b.images);
    assert_ne!(a.images[0].pixels, a.images[1].pixels);
    assert_eq!((a.images[0].width, a.images[0].height, a.images[0].channels), (28, 28, 1));
    // Guidance doubles the batch inside one forward; NFE counts forwards.
    assert_eq!(a.stats.nfe(), 3);
    assert_eq!(a.stats.evaluations.len(), 1);
}

/// The SiT-convention network seen through LFM's convention: v_lfm(x, t) = -v_sit(x, 1 - t).
struct AsLfm(SitVelocity);

impl VelocityModel for AsLfm {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let t_sit = (1.0 - t)?;
        Ok(self.0.forward(x, &t_sit, y)?.neg()?)
    }
    fn convention(&self) -> TimeConvention {
        TimeConvention::Lfm
    }
}

#[test]
fn lfm_and_sit_conventions_give_the_same_sample() {
    let cfg = tiny_latent_config("t");
    let build = |convention| {
        let (vb, _) = random_var_builder(9, &Device::Cpu);
        SitVelocity { net: Sit::new(&sit_of(&cfg), vb).unwrap(), convention }
    };
    let sit = Pipeline::from_parts(cfg.clone(), Box::new(build(TimeConvention::Sit)), None, &Device::Cpu);
    let lfm = Pipeline::from_parts(cfg.clone(), Box::new(AsLfm(build(TimeConvention::Sit))), None, &Device::Cpu);
    for sampler in [Sampler::Euler, Sampler::Rk4] {
        let (shared, images) = (settings(sampler, 5), inputs(4));
        let (a, _) = sit.sample_state(&shared, &images, &mut Unobserved).unwrap();
        let (b, _) = lfm.sample_state(&shared, &images, &mut Unobserved).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
    assert_eq!(TimeConvention::RectifiedFlow999.network_time(0.0), 0.999);
    assert!((TimeConvention::RectifiedFlow999.network_time(1.0) - 999.0).abs() < 1e-9);
}

#[test]
fn weights_that_do_not_fit_are_reported_together() {
    let cfg = sit_of(&tiny_latent_config("t"));
    let (vb, created) = random_var_builder(0, &Device::Cpu);
    Sit::new(&cfg, vb).unwrap();
    let mut tensors: HashMap<String, Tensor> = created.lock().unwrap().clone();
    tensors.remove("blocks.1.attn.qkv.weight");
    tensors.insert("final_layer.linear.weight".into(), Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap());
    tensors.insert("blocks.7.extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    save_safetensors(&tensors, &path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "weights must be readable by a server running as another user");
    }
    let err = WeightsFile::open(&path).unwrap().build(DType::F32, &Device::Cpu, |vb| Sit::new(&cfg, vb)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::WeightsMismatch { .. }), "{msg}");
    assert!(msg.contains("missing (1)") && msg.contains("blocks.1.attn.qkv.weight [96, 32]"), "{msg}");
    assert!(
        msg.contains("mis-shaped (1)")
            && msg.contains("final_layer.linear.weight: model expects [4, 32], file has [5, 32]"),
        "{msg}"
    );
    assert!(msg.contains("unexpected (1)") && msg.contains("blocks.7.extra.weight"), "{msg}");
}

#[test]
fn bad_model_directories_fail_clearly() {
    let (dir, _) = tiny_model_dir();
    std::fs::remove_file(dir.path().join("velocity.safetensors")).unwrap();
    let msg = Pipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("velocity.safetensors") && msg.contains("not found"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let msg = Pipeline::load(empty.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("model.toml"), "{msg}");

    let (dir, _) = tiny_model_dir();
    std::fs::write(dir.path().join("velocity.safetensors"), b"not a safetensors file").unwrap();
    let msg = Pipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("cannot read weights"), "{msg}");

    let (dir, _) = tiny_model_dir();
    let toml =
        std::fs::read_to_string(dir.path().join("model.toml")).unwrap().replace("num_heads = 2", "num_heads = 3");
    std::fs::write(dir.path().join("model.toml"), toml).unwrap();
    let msg = Pipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("hidden_size 32 is not a multiple of num_heads 3"), "{msg}");
}

#[test]
fn guidance_applies_only_inside_the_requested_interval() {
    let (dir, _) = tiny_model_dir();
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    let state = |guidance: f64, guidance_interval: (f64, f64)| {
        let shared = SolveSettings { guidance, guidance_interval, ..settings(Sampler::Euler, 4) };
        pipeline
            .sample_state(&shared, &inputs(2), &mut Unobserved)
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    // Euler at 4 steps evaluates s = 0, 0.25, 0.5, 0.75: an interval [0.9, 1] never guides.
    assert_eq!(state(3.0, (0.9, 1.0)), state(1.0, (0.0, 1.0)));
    assert_ne!(state(3.0, (0.0, 1.0)), state(1.0, (0.0, 1.0)));
    assert_ne!(state(3.0, (0.5, 1.0)), state(3.0, (0.0, 1.0)));
}

#[test]
fn invalid_requests_name_the_field() {
    let (dir, _) = tiny_model_dir();
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    let check = |shared: SolveSettings, images: ImageInputs, field: &str| {
        let err = pipeline.generate(&shared, &images, &mut Unobserved).unwrap_err();
        assert!(matches!(&err, Error::Invalid { field: f, .. } if *f == field), "{field}: {err}");
    };
    let euler = || settings(Sampler::Euler, 1);
    check(SolveSettings { steps: 0, ..euler() }, inputs(1), "steps");
    check(euler(), ImageInputs { labels: vec![10], ..inputs(1) }, "label");
    check(euler(), ImageInputs::default(), "n");
    check(SolveSettings { guidance: f64::NAN, ..euler() }, inputs(1), "guidance");
    check(euler(), ImageInputs { seeds: vec![1, 2], ..inputs(1) }, "seeds");
    check(SolveSettings { guidance_interval: (0.5, 0.2), ..euler() }, inputs(1), "guidance_interval");
    check(SolveSettings { guidance_interval: (0.0, 1.5), ..euler() }, inputs(1), "guidance_interval");
    let cfg = pipeline.config();
    assert_eq!(cfg.parse_labels("0-2,seven").unwrap(), vec![0, 1, 2, 7]);
    assert!(cfg.parse_label("11").unwrap_err().to_string().contains("out of range"));
}

/// A network that panics: the engine thread must survive it.
struct Exploding;

impl VelocityModel for Exploding {
    fn forward(&self, x: &Tensor, _t: &Tensor, y: &Tensor) -> Result<Tensor> {
        if y.to_vec1::<u32>()?[0] == 3 {
            panic!("boom");
        }
        Ok(x.zeros_like()?)
    }
    fn convention(&self) -> TimeConvention {
        TimeConvention::Sit
    }
}

#[test]
fn engine_thread_survives_a_panicking_job_and_reports_progress() {
    let mut cfg = tiny_latent_config("t");
    cfg.autoencoder = None;
    let NetworkArch::Sit(sit) = &mut cfg.network.arch else { panic!("a sit network") };
    sit.in_channels = 1;
    let pipeline = Pipeline::from_parts(cfg, Box::new(Exploding), None, &Device::Cpu);
    let engine = EngineHandle::spawn(pipeline, 4).unwrap();
    let quiet = || Box::new(|_: &StepReport| ControlFlow::Continue(())) as flowgen_engine::handle::Progress;
    let unguided = |steps| SolveSettings { guidance: 1.0, ..settings(Sampler::Euler, steps) };
    let one = |label| ImageInputs { labels: vec![label], seeds: vec![0] };
    let bad = GenerationRequest { settings: unguided(2), inputs: one(3) };
    assert!(matches!(engine.generate(bad, quiet()), Err(Error::EnginePanicked(m)) if m.contains("boom")));
    let (tx, rx) = std::sync::mpsc::channel();
    let progress = Box::new(move |r: &StepReport| {
        let _ = tx.send(r.step);
        ControlFlow::Continue(())
    });
    let good = GenerationRequest { settings: unguided(3), inputs: one(1) };
    let out = engine.generate(good.clone(), progress).unwrap();
    assert_eq!(out.images.len(), 1);
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    // Cancelling from the progress callback stops the job between steps.
    let cancelled = engine.generate(
        good,
        Box::new(|r: &StepReport| if r.step >= 1 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }),
    );
    assert!(matches!(cancelled, Err(Error::Cancelled)));
}

fn tiny_flowturbo_dir() -> (tempfile::TempDir, Pipeline) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = flowgen_engine::random_model::with_tiny_refiner(tiny_latent_config("ft"), "flowturbo:H1P2R2");
    write_random_model(dir.path(), &cfg, 42).unwrap();
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    (dir, pipeline)
}

#[test]
fn flowturbo_runs_the_models_recommended_plan_with_its_refiner() {
    use flowgen_engine::samplers::REFINER_NETWORK;
    use flowgen_engine::{ScheduleAccess, SettingsRequest};
    let (_dir, pipeline) = tiny_flowturbo_dir();
    let cfg = pipeline.config();
    let request = SettingsRequest { sampler: Some("FlowTurbo".into()), ..Default::default() };
    let settings = cfg.solve_settings(&request, ScheduleAccess::Named).unwrap();
    assert_eq!(settings.sampler.canonical(), "flowturbo:H1P2R2");
    assert_eq!(settings.steps, 5, "the plan's own steps win over [defaults] steps = 4");
    let batch = pipeline.generate(&settings, &inputs(3), &mut Unobserved).unwrap();
    assert_eq!(batch.images.len(), 3);
    assert_eq!(batch.stats.nfe(), 4);
    assert_eq!(batch.stats.evaluations[REFINER_NETWORK], 4);
    // Each image depends on its own seed only, batched or alone (the refiner is guided per row too).
    for i in 0..3 {
        let one = ImageInputs { labels: vec![inputs(3).labels[i]], seeds: vec![inputs(3).seeds[i]] };
        let alone = pipeline.generate(&settings, &one, &mut Unobserved).unwrap();
        let gap = (batch.state.narrow(0, i, 1).unwrap() - &alone.state).unwrap();
        let diff = gap.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "image {i}: {diff}");
    }
    // The refiner changes the result: the same plan without its R steps' refiner is not it.
    let no_refiner = SettingsRequest { sampler: Some("flowturbo:H1P4R0".into()), ..Default::default() };
    let plain = cfg.solve_settings(&no_refiner, ScheduleAccess::Named).unwrap();
    let plain = pipeline.generate(&plain, &inputs(3), &mut Unobserved).unwrap();
    assert!((plain.state - &batch.state).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn flowturbo_requests_that_cannot_run_name_the_field() {
    use flowgen_engine::{ScheduleAccess, SettingsRequest};
    let (_dir, cfg) = tiny_model_dir();
    let ask = |sampler: &str, steps: Option<usize>| {
        let request = SettingsRequest { sampler: Some(sampler.into()), steps, ..Default::default() };
        cfg.solve_settings(&request, ScheduleAccess::Named).unwrap_err().to_string()
    };
    let err = ask("flowturbo", None);
    assert!(err.contains("sampler") && err.contains("needs a plan"), "{err}");
    let err = ask("flowturbo:H2P2R1", None);
    assert!(err.contains("sampler") && err.contains("\"refiner\"") && err.contains("[networks.refiner]"), "{err}");
    let (_dir, pipeline) = tiny_flowturbo_dir();
    let request = SettingsRequest { sampler: Some("flowturbo".into()), steps: Some(8), ..Default::default() };
    let err = pipeline.config().solve_settings(&request, ScheduleAccess::Named).unwrap_err().to_string();
    assert!(err.contains("steps") && err.contains("runs 5 steps, not 8"), "{err}");
    // A plan without refiner steps needs no refiner.
    let request = SettingsRequest { sampler: Some("flowturbo:H2P2".into()), ..Default::default() };
    assert_eq!(cfg.solve_settings(&request, ScheduleAccess::Named).unwrap().steps, 4);
}
