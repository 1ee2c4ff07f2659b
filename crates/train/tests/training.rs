//! Short training runs on tiny data: the loss falls, and a stopped run resumed from its
//! checkpoint ends bit-for-bit where an uninterrupted run ends.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{Device, Tensor};
use flowgen_engine::models::autoencoder::AutoencoderConfig;
use flowgen_engine::models::sit::SitConfig;
use flowgen_train::autoencoder::{self, AutoencoderTraining};
use flowgen_train::data::Digits;
use flowgen_train::log::read_csv;
use flowgen_train::losses::{Objective, PairCost};
use flowgen_train::run::{seeded_normal, RunPlace, StepLog, TrainOptions};
use flowgen_train::velocity::{self, Latents, VelocityTraining};
use flowgen_train::TrainError;

/// 32 synthetic 28x28 "digits": a bright bar whose position depends on the label.
fn tiny_digits() -> Digits {
    let (n, side) = (32usize, 28usize);
    let mut images = vec![0u8; n * side * side];
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    for (i, &l) in labels.iter().enumerate() {
        let row = 2 + 2 * l as usize;
        for col in 4..24 {
            images[i * side * side + row * side + col] = 255;
            images[i * side * side + (row + 1) * side + col] = 200;
        }
    }
    Digits { images, labels, rows: side, cols: side }
}

fn opts(steps: usize) -> TrainOptions {
    TrainOptions {
        steps,
        batch_size: 8,
        lr: 3e-3,
        warmup: 2,
        weight_decay: 0.0,
        grad_clip: 1.0,
        ema_decay: 0.9,
        seed: 3,
        checkpoint_every: 5,
        log_every: 1,
    }
}

fn tiny_autoencoder(steps: usize) -> AutoencoderTraining {
    AutoencoderTraining {
        arch: AutoencoderConfig {
            in_channels: 1,
            out_channels: 1,
            latent_channels: 4,
            block_out_channels: vec![8, 8, 8],
            layers_per_block: 1,
            norm_num_groups: 4,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        },
        kl_weight: 1e-3,
        opts: opts(steps),
    }
}

fn go(_: &StepLog) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn first_and_last_loss(dir: &Path) -> (f64, f64) {
    let (_, rows) = read_csv(&dir.join("loss.csv")).unwrap();
    let avg = |r: &[Vec<f64>]| r.iter().map(|row| row[1]).sum::<f64>() / r.len() as f64;
    (avg(&rows[..4]), avg(&rows[rows.len() - 4..]))
}

#[test]
fn autoencoder_loss_falls_and_resume_is_exact() {
    let data = tiny_digits();
    let dev = Device::Cpu;
    let full = tempfile::tempdir().unwrap();
    let report = autoencoder::train(
        &tiny_autoencoder(20),
        (&data, &data),
        RunPlace { out: full.path(), device: &dev, resume: false },
        &mut go,
    )
    .unwrap();
    let (first, last) = first_and_last_loss(full.path());
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert!(report.val_psnr_db.is_finite() && report.scaling_factor > 0.0);
    for file in ["autoencoder.safetensors", "autoencoder.toml", "reconstructions.png", "report.json", "loss.csv"] {
        assert!(full.path().join(file).exists(), "{file}");
    }

    // Stop after step 7, resume, and compare with the uninterrupted run.
    let split = tempfile::tempdir().unwrap();
    let mut stop_at_7 = |log: &StepLog| if log.step == 7 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
    let err = autoencoder::train(
        &tiny_autoencoder(20),
        (&data, &data),
        RunPlace { out: split.path(), device: &dev, resume: false },
        &mut stop_at_7,
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::Interrupted { step: 7 }), "{err}");
    autoencoder::train(
        &tiny_autoencoder(20),
        (&data, &data),
        RunPlace { out: split.path(), device: &dev, resume: true },
        &mut go,
    )
    .unwrap();
    let a = candle_core::safetensors::load(full.path().join("autoencoder.safetensors"), &dev).unwrap();
    let b = candle_core::safetensors::load(split.path().join("autoencoder.safetensors"), &dev).unwrap();
    for (name, t) in &a {
        let diff =
            (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} differs after resume");
    }
    let (_, rows) = read_csv(&split.path().join("loss.csv")).unwrap();
    assert_eq!(rows.iter().map(|r| r[0] as usize).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());

    // A different configuration refuses to resume that checkpoint.
    let mut other = tiny_autoencoder(20);
    other.kl_weight = 0.5;
    let err =
        autoencoder::train(&other, (&data, &data), RunPlace { out: split.path(), device: &dev, resume: true }, &mut go)
            .unwrap_err();
    assert!(err.to_string().contains("different run"), "{err}");
}

fn tiny_latents() -> Latents {
    let dev = Device::Cpu;
    // Class-dependent means so there is structure to learn.
    let labels: Vec<u32> = (0..64).map(|i| i % 4).collect();
    let offsets: Vec<f32> = labels.iter().flat_map(|&l| std::iter::repeat_n(l as f32 - 1.5, 4 * 4 * 4)).collect();
    let offsets = Tensor::from_vec(offsets, (64, 4, 4, 4), &dev).unwrap();
    let mean = (seeded_normal(1, 0, 0, &[64, 4, 4, 4], &dev).unwrap() * 0.3).unwrap().add(&offsets).unwrap();
    Latents { std: (mean.ones_like().unwrap() * 0.05).unwrap(), mean, labels }
}

fn tiny_velocity(objective: Objective, steps: usize) -> VelocityTraining {
    VelocityTraining {
        sit: SitConfig {
            input_size: 4,
            in_channels: 4,
            patch_size: 1,
            hidden_size: 32,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 2.0,
            num_classes: 4,
            class_dropout_prob: 0.1,
            learn_sigma: false,
            in_channels_scale: 1,
        },
        objective,
        opts: TrainOptions { batch_size: 16, ..opts(steps) },
    }
}

#[test]
fn velocity_objectives_lower_the_loss_and_resume_exactly() {
    let latents = tiny_latents();
    let dev = Device::Cpu;
    for objective in [Objective::Icfm, Objective::Wcfm { kappa: 0.5, cost: PairCost::Euclidean }, Objective::Otcfm] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_velocity(objective.clone(), 20);
        let (report, ema) =
            velocity::train(&cfg, &latents, RunPlace { out: dir.path(), device: &dev, resume: false }, &mut go)
                .unwrap();
        let (first, last) = first_and_last_loss(dir.path());
        assert!(last < 0.8 * first, "{}: loss {first} -> {last}", objective.name());
        assert!(ema.contains_key("blocks.1.attn.qkv.weight"));
        assert_eq!(report.steps, 20);
    }
    let cfg = tiny_velocity(Objective::Wcfm { kappa: 0.5, cost: PairCost::Euclidean }, 12);
    let full = tempfile::tempdir().unwrap();
    let (_, a) =
        velocity::train(&cfg, &latents, RunPlace { out: full.path(), device: &dev, resume: false }, &mut go).unwrap();
    let split = tempfile::tempdir().unwrap();
    let mut stop = |log: &StepLog| if log.step == 5 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
    assert!(velocity::train(&cfg, &latents, RunPlace { out: split.path(), device: &dev, resume: false }, &mut stop)
        .is_err());
    let (_, b) =
        velocity::train(&cfg, &latents, RunPlace { out: split.path(), device: &dev, resume: true }, &mut go).unwrap();
    for (name, t) in &a {
        let same =
            (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(same, 0.0, "{name}");
    }
}

#[test]
fn refiner_beats_velocity_reuse_resumes_exactly_and_installs_into_its_model() {
    use flowgen_engine::models::sit::Sit;
    use flowgen_engine::random_model::{tiny_latent_config, write_random_model};
    use flowgen_engine::samplers::{Unobserved, REFINER_NETWORK};
    use flowgen_engine::{ImageInputs, Pipeline, ScheduleAccess, SettingsRequest};
    use flowgen_train::flowturbo::{self, RefinerTraining};
    let dev = Device::Cpu;
    let latents = tiny_latents();
    // A teacher with some training behind it, so its velocity field has structure to refine.
    let teacher_cfg = tiny_velocity(Objective::Icfm, 60);
    let dir = tempfile::tempdir().unwrap();
    let (_, ema) =
        velocity::train(&teacher_cfg, &latents, RunPlace { out: dir.path(), device: &dev, resume: false }, &mut go)
            .unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(ema, candle_core::DType::F32, &dev);
    let teacher = Sit::new(&teacher_cfg.sit, vb).unwrap();
    let cfg = RefinerTraining {
        refiner: RefinerTraining::refiner_for(&teacher_cfg.sit, 16, 1, 2),
        dt_range: (0.0, 0.12),
        opts: TrainOptions { batch_size: 16, lr: 3e-3, ..opts(60) },
    };
    let run = tempfile::tempdir().unwrap();
    let (report, weights) =
        flowturbo::train(&cfg, &teacher, &latents, RunPlace { out: run.path(), device: &dev, resume: false }, &mut go)
            .unwrap();
    let (header, rows) = read_csv(&run.path().join("loss.csv")).unwrap();
    let (loss, reuse) =
        (header.iter().position(|h| h == "loss").unwrap(), header.iter().position(|h| h == "reuse_loss").unwrap());
    let late = &rows[rows.len() - 3..];
    let mean = |col: usize| late.iter().map(|r| r[col]).sum::<f64>() / late.len() as f64;
    assert!(mean(loss) < 0.8 * mean(reuse), "refiner {} vs reusing v {}", mean(loss), mean(reuse));
    assert!(report.flops_ratio > 0.0 && report.flops_ratio < 0.5, "{}", report.flops_ratio);
    assert!(weights.contains_key("x_embedder.proj.weight") && weights.contains_key("blocks.0.attn.qkv.weight"));

    // Stopped after step 20 and resumed: the same weights as the straight run.
    let split = tempfile::tempdir().unwrap();
    let mut stop = |log: &StepLog| if log.step == 20 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
    let place = |resume| RunPlace { out: split.path(), device: &dev, resume };
    assert!(flowturbo::train(&cfg, &teacher, &latents, place(false), &mut stop).is_err());
    let (_, resumed) = flowturbo::train(&cfg, &teacher, &latents, place(true), &mut go).unwrap();
    for (name, t) in &weights {
        let diff = (t - &resumed[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }

    // Installed into a model directory of the right shape, it serves plain `flowturbo`.
    let model = tempfile::tempdir().unwrap();
    let base = tiny_latent_config("with-refiner");
    write_random_model(model.path(), &base, 3).unwrap();
    let flowgen_engine::NetworkArch::Sit(sit) = &base.network.arch else { panic!("a sit") };
    let refiner = RefinerTraining::refiner_for(sit, 16, 1, 2);
    let (vb, created) = flowgen_engine::random_model::random_var_builder(9, &dev);
    Sit::new(&refiner, vb).unwrap();
    let random = created.lock().unwrap().clone();
    flowturbo::install_refiner(model.path(), &refiner, &random, Some("flowturbo:H1P1R1")).unwrap();
    let pipeline = Pipeline::load(model.path(), &dev).unwrap();
    let request = SettingsRequest { sampler: Some("flowturbo".into()), ..Default::default() };
    let settings = pipeline.config().solve_settings(&request, ScheduleAccess::Named).unwrap();
    let out = pipeline.generate(&settings, &ImageInputs::cycle(&[1, 2], 2, 0), &mut Unobserved).unwrap();
    assert_eq!((out.images.len(), out.stats.evaluations[REFINER_NETWORK]), (2, 2));
    let err = flowturbo::install_refiner(model.path(), &refiner, &random, Some("flowturbo:H0P0R0")).unwrap_err();
    assert!(err.to_string().contains("no steps"), "{err}");
}

#[test]
fn straightening_fits_the_chords_resumes_exactly_and_writes_a_servable_model() {
    use flowgen_engine::config::ModelConfig;
    use flowgen_engine::random_model::{tiny_latent_config, write_random_model};
    use flowgen_engine::samplers::Unobserved;
    use flowgen_engine::{ImageInputs, NetworkArch, Pipeline, ScheduleAccess, SettingsRequest, TimeConvention};
    use flowgen_train::boss::straighten::{self, StraightenTraining, StraightenedModel, TeacherSetup, Trajectories};
    let dev = Device::Cpu;
    let teacher_dir = tempfile::tempdir().unwrap();
    write_random_model(teacher_dir.path(), &tiny_latent_config("teacher"), 5).unwrap();
    let pipeline = Pipeline::load(teacher_dir.path(), &dev).unwrap();
    let NetworkArch::Sit(sit) = pipeline.config().network.arch.clone() else { panic!("a sit") };
    let setup = TeacherSetup {
        times: vec![0.0, 0.4, 0.75, 1.0],
        trajectories: 48,
        held_out: 8,
        teacher_steps: 4,
        noise_seed: 77,
        guidance: 1.5,
        guidance_interval: (0.0, 1.0),
    };
    let run = tempfile::tempdir().unwrap();
    let mut drawn = 0;
    let first = Trajectories::cached(run.path(), &pipeline, &setup, &mut |n| drawn = n).unwrap();
    assert_eq!((drawn, first.states.dims()), (48, &[48, 4, 4, 7, 7][..]));
    // The second call reads the cache: same states, and nothing drawn.
    let mut redrawn = 0;
    let again = Trajectories::cached(run.path(), &pipeline, &setup, &mut |n| redrawn = n).unwrap();
    let diff = (&first.states - &again.states).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert_eq!((redrawn, diff.to_scalar::<f32>().unwrap()), (0, 0.0));
    // Trajectory 0 starts from its own seed's noise.
    let noise0 = flowgen_engine::noise::batch(&[77], &[4, 7, 7], &dev).unwrap();
    let start = first.states.get(0).unwrap().get(0).unwrap().unsqueeze(0).unwrap();
    assert_eq!((start - noise0).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

    let cfg =
        StraightenTraining { teacher: setup.clone(), opts: TrainOptions { batch_size: 16, lr: 2e-3, ..opts(40) } };
    let weights = teacher_dir.path().join("velocity.safetensors");
    let out = tempfile::tempdir().unwrap();
    fn place<'a>(dir: &'a Path, device: &'a Device, resume: bool) -> RunPlace<'a> {
        RunPlace { out: dir, device, resume }
    }
    let (report, ema) =
        straighten::train(&cfg, &sit, TimeConvention::Sit, &weights, &first, place(out.path(), &dev, false), &mut go)
            .unwrap();
    let total = |h: &straighten::HeldOut| h.chord_loss.iter().sum::<f64>();
    assert_eq!(report.teacher.chord_loss.len(), 3);
    assert!(total(&report.straightened) < 0.7 * total(&report.teacher), "{report:?}");
    assert!(report.straightened.euler_end_rmse < report.teacher.euler_end_rmse, "{report:?}");

    // Stopped after step 15 and resumed: the same weights as the straight run.
    let split = tempfile::tempdir().unwrap();
    let mut stop = |log: &StepLog| if log.step == 15 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
    assert!(straighten::train(
        &cfg,
        &sit,
        TimeConvention::Sit,
        &weights,
        &first,
        place(split.path(), &dev, false),
        &mut stop
    )
    .is_err());
    let (_, resumed) =
        straighten::train(&cfg, &sit, TimeConvention::Sit, &weights, &first, place(split.path(), &dev, true), &mut go)
            .unwrap();
    for (name, t) in &ema {
        let diff = (t - &resumed[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }

    // The written model serves Euler on its schedule by default.
    let model = tempfile::tempdir().unwrap();
    let parts = StraightenedModel {
        teacher_dir: teacher_dir.path(),
        schedule_name: "tiny-3",
        times: &setup.times,
        guidance: 1.5,
    };
    straighten::write_model(model.path(), parts, &sit, &ema).unwrap();
    let config = ModelConfig::load(model.path()).unwrap();
    assert_eq!((config.defaults.sampler.as_str(), config.defaults.schedule.as_str()), ("euler", "tiny-3"));
    assert_eq!(config.schedules["tiny-3"], setup.times);
    let pipeline = Pipeline::load(model.path(), &dev).unwrap();
    let settings = pipeline.config().solve_settings(&SettingsRequest::default(), ScheduleAccess::Named).unwrap();
    let out = pipeline.generate(&settings, &ImageInputs::cycle(&[1, 2], 2, 0), &mut Unobserved).unwrap();
    assert_eq!((out.images.len(), out.stats.nfe()), (2, 3));
}

#[test]
fn blockwise_stages_train_resume_exactly_and_write_a_servable_model() {
    use flowgen_engine::config::AutoencoderSection;
    use flowgen_engine::models::blockwise::BlockwiseConfig;
    use flowgen_engine::random_model::{tiny_latent_config, write_random_model};
    use flowgen_engine::samplers::Unobserved;
    use flowgen_engine::{ImageInputs, Pipeline, ScheduleAccess, SettingsRequest};
    use flowgen_train::blockwise::{self, AlignmentTargets, BlockwiseModelParts, BlockwiseTraining, FrnTraining};
    use flowgen_train::velocity::ModelDirCommon;
    let dev = Device::Cpu;
    let latents = tiny_latents();
    let net = BlockwiseConfig {
        input_size: 4,
        in_channels: 4,
        patch_size: 1,
        hidden_size: 16,
        num_heads: 2,
        mlp_ratio: 2.0,
        num_classes: 4,
        class_dropout_prob: 0.1,
        learn_sigma: false,
        segments: 3,
        segment_depth: 1,
        feature_alignment_depth: 1,
        frn_depth: 0,
        adaln_lora_dim: 4,
        dim_projection: 6,
        projection_hidden: 8,
        rope_theta: 10000.0,
        abs_pos_embed: false,
    };
    // Alignment targets with structure: a per-class pattern over the 16 tokens and 6 channels.
    let pattern: Vec<f32> = latents
        .labels
        .iter()
        .flat_map(|&l| (0..16 * 6).map(move |i| ((i as f32 * 0.37 + l as f32 * 1.3).sin()).max(0.0)))
        .collect();
    let targets = AlignmentTargets { features: Tensor::from_vec(pattern, (64, 16, 6), &dev).unwrap() };
    let cfg =
        BlockwiseTraining { net: net.clone(), align_weight: 0.5, opts: TrainOptions { batch_size: 12, ..opts(40) } };
    let dir = tempfile::tempdir().unwrap();
    fn place<'a>(dir: &'a Path, device: &'a Device, resume: bool) -> RunPlace<'a> {
        RunPlace { out: dir, device, resume }
    }
    let place = |dir, resume| place(dir, &dev, resume);
    let (report, ema) = blockwise::train(&cfg, &latents, Some(&targets), place(dir.path(), false), &mut go).unwrap();
    let (header, rows) = read_csv(&dir.path().join("loss.csv")).unwrap();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let mean = |r: &[Vec<f64>], c: usize| r.iter().map(|row| row[c]).sum::<f64>() / r.len() as f64;
    let (early, late) = (&rows[..4], &rows[rows.len() - 4..]);
    assert!(mean(late, col("velocity_loss")) < 0.8 * mean(early, col("velocity_loss")), "velocity loss did not fall");
    assert!(mean(late, col("align_loss")) < mean(early, col("align_loss")) - 0.05, "alignment did not improve");
    assert!(report.final_align_loss < 0.0 && report.parameters > 0);
    for name in [
        "representation_blocks.0.attn.q_norm.weight",
        "velocity_blocks.2.0.adaLN_modulation.2.weight",
        "linear_projection.4.weight",
    ] {
        assert!(ema.contains_key(name), "{name}");
    }
    // Without alignment the projection head gets no gradient and the align column stays 0.
    let plain = BlockwiseTraining { align_weight: 0.0, ..cfg.clone() };
    let plain_dir = tempfile::tempdir().unwrap();
    let (plain_report, _) = blockwise::train(&plain, &latents, None, place(plain_dir.path(), false), &mut go).unwrap();
    assert_eq!(plain_report.final_align_loss, 0.0);
    let nowhere = tempfile::tempdir().unwrap();
    let err = blockwise::train(&cfg, &latents, None, place(nowhere.path(), false), &mut go);
    assert!(err.unwrap_err().to_string().contains("alignment targets"));

    // Stopped after step 13 and resumed: the same weights as the straight run.
    let split = tempfile::tempdir().unwrap();
    let mut stop = |log: &StepLog| if log.step == 13 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
    assert!(blockwise::train(&cfg, &latents, Some(&targets), place(split.path(), false), &mut stop).is_err());
    let (_, resumed) = blockwise::train(&cfg, &latents, Some(&targets), place(split.path(), true), &mut go).unwrap();
    for (name, t) in &ema {
        let diff = (t - &resumed[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }

    // FRN stage: only frn_blocks.* train, and they beat reusing the anchor.
    let frn_cfg = FrnTraining {
        net: BlockwiseConfig { frn_depth: 1, ..net.clone() },
        opts: TrainOptions { batch_size: 12, lr: 5e-3, ..opts(150) },
    };
    let frn_dir = tempfile::tempdir().unwrap();
    let (frn_report, frn) =
        blockwise::train_frn(&frn_cfg, ema.clone(), &latents, place(frn_dir.path(), false), &mut go).unwrap();
    assert!(
        frn.keys().all(|k| k.starts_with("frn_blocks.")) && frn.contains_key("frn_blocks.0.adaLN_modulation.1.weight")
    );
    assert!(
        frn_report.final_loss < 0.8 * frn_report.anchor_reuse_loss,
        "FRN {} vs anchor reuse {}",
        frn_report.final_loss,
        frn_report.anchor_reuse_loss
    );

    // Written as a model directory (a random tiny autoencoder of the latent shape), it serves.
    let base = tiny_latent_config("ae-source");
    let ae_dir = tempfile::tempdir().unwrap();
    write_random_model(ae_dir.path(), &base, 4).unwrap();
    let section: AutoencoderSection = base.autoencoder.clone().unwrap();
    let model = tempfile::tempdir().unwrap();
    // The tiny autoencoder decodes 7x7 latents: a 7x7 network of the same recipe.
    let net7 = BlockwiseConfig { input_size: 7, frn_depth: 1, num_classes: 10, ..net.clone() };
    let (vb, created) = flowgen_engine::random_model::random_var_builder(5, &dev);
    flowgen_engine::models::blockwise::Blockwise::new(&net7, vb).unwrap();
    let weights = created.lock().unwrap().clone();
    let common = ModelDirCommon {
        name: "tiny-blockwise",
        autoencoder: &section,
        autoencoder_weights: &ae_dir.path().join("autoencoder.safetensors"),
        defaults: flowgen_engine::config::Defaults {
            sampler: "euler".into(),
            steps: 6,
            guidance: 1.5,
            ..Default::default()
        },
    };
    let parts = BlockwiseModelParts { net: &net7, weights: &weights, common };
    blockwise::write_model_dir(model.path(), parts).unwrap();
    let pipeline = Pipeline::load(model.path(), &dev).unwrap();
    let settings = pipeline.config().solve_settings(&SettingsRequest::default(), ScheduleAccess::Named).unwrap();
    let out = pipeline.generate(&settings, &ImageInputs::cycle(&[0, 3], 2, 0), &mut Unobserved).unwrap();
    assert_eq!((out.images.len(), out.stats.nfe()), (2, 6));
}
