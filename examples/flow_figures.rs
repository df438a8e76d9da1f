//! The request-path figures of docs/FLOWS.md: a cascade of the int8 text-direction
//! classifier before the fp32 one on rendered text lines, a fan-out with a slow step under
//! a deadline, and the result cache's hit path. Every figure is measured in this run, same
//! build, one thread per session.
//!
//! usage: flow_figures MODELS_DIR IMAGES_DIR
//! MODELS_DIR holds ppocr_cls/ and ppocr_cls_int8_qdq/ (scripts/fetch-models' cache);
//! IMAGES_DIR is filled by scripts/make_text_images.py (NNN_<angle>.png).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::{Model, Outputs, Session, SessionOptions, Tensor};
use tern_flows::{
    CacheOptions, Calibration, Cascade, Confidence, Exit, FanOut, ResultCache, Source, Step,
};

type Sample = Vec<(String, Tensor)>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [models, images] = args.as_slice() else {
        return Err("usage: flow_figures MODELS_DIR IMAGES_DIR".into());
    };
    let spec: tern_quantize::images::Preprocess =
        "size=48x192,order=bgr,mean=0.5,std=0.5".parse()?;
    let samples = tern_quantize::images::samples_from_folder(images, &spec, "x")?;
    let mut files: Vec<String> = std::fs::read_dir(images)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|f| f.ends_with(".png"))
        .collect();
    files.sort();
    let labels: Vec<usize> = files
        .iter()
        .map(|f| f.ends_with("_180.png") as usize)
        .collect();

    let session = |name: &str| -> Result<Arc<Session>, Box<dyn std::error::Error>> {
        let m = Model::load(models.join(name).join("model.onnx"))?;
        Ok(Arc::new(Session::new(
            &m,
            SessionOptions::new().threads(1),
        )?))
    };
    let (small, big) = (session("ppocr_cls_int8_qdq")?, session("ppocr_cls")?);
    let output = big.output_names()[0].clone();
    let small_step = Step::session("int8", small).build()?;
    let big_step = Step::session("fp32", big.clone()).build()?;
    let class = |o: &Outputs| -> usize {
        let v = o
            .get(&output)
            .and_then(|t| t.to_f32_vec().ok())
            .unwrap_or_default();
        (v.get(1) > v.first()) as usize
    };

    // Calibration: exit rate and agreement with the fp32 answer per threshold.
    let exit = Exit::new(&output, Confidence::MaxProbability, 0.0);
    let thresholds: Vec<f32> = (0..=9).map(|i| 0.5 + i as f32 * 0.05).collect();
    let calibration = Calibration::run(&small_step, &big_step, &exit, &samples, None, &thresholds)?;
    println!("## Calibration ({} rendered text lines)\n", samples.len());
    println!("| threshold | int8 exit rate | agreement with fp32 |\n|---|---|---|");
    for p in &calibration.points {
        println!(
            "| {:.2} | {:.1} % | {:.1} % |",
            p.threshold,
            100.0 * p.exit_rate,
            100.0 * p.agreement
        );
    }
    let target = 0.98;
    let picked = calibration
        .pick(target)
        .ok_or("no threshold reaches the target agreement")?;
    println!(
        "\npicked for ≥ {:.0} % agreement: {:.2}\n",
        100.0 * target,
        picked.threshold
    );

    // The cascade at the picked threshold against fp32 alone, alternating per sample.
    let cascade = Cascade::builder("direction")
        .stage(
            small_step,
            Exit::new(&output, Confidence::MaxProbability, picked.threshold),
        )
        .last(big_step)
        .build()?;
    let rounds = 3;
    let (mut alone, mut flow) = (Vec::new(), Vec::new());
    let (mut agree, mut right_alone, mut right_flow) = (0, 0, 0);
    for _ in 0..rounds {
        for (sample, &label) in samples.iter().zip(&labels) {
            let t = Instant::now();
            let want = big.run(sample.clone())?;
            alone.push(t.elapsed());
            let t = Instant::now();
            let got = cascade.run(sample)?;
            flow.push(t.elapsed());
            agree += (class(&got.answer.outputs) == class(&want)) as usize;
            right_alone += (class(&want) == label) as usize;
            right_flow += (class(&got.answer.outputs) == label) as usize;
        }
    }
    let n = (rounds * samples.len()) as f64;
    let stats = cascade.stats();
    println!("## Cascade: int8 ppocr_cls, then fp32 when unsure\n");
    println!("| | mean ms | p95 ms | int8 exit rate | agreement with fp32 | accuracy (labels) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| fp32 alone | {:.2} | {:.2} | – | 100 % | {:.1} % |",
        mean_ms(&alone),
        pct_ms(&mut alone, 0.95),
        100.0 * right_alone as f64 / n
    );
    println!(
        "| cascade (t = {:.2}) | {:.2} | {:.2} | {:.1} % | {:.1} % | {:.1} % |\n",
        picked.threshold,
        mean_ms(&flow),
        pct_ms(&mut flow, 0.95),
        100.0 * stats.exit_rate(0),
        100.0 * agree as f64 / n,
        100.0 * right_flow as f64 / n
    );

    // Fan-out: fp32 plus a step that takes 200 ms, under a 30 ms deadline.
    let deadline = Duration::from_millis(30);
    let slow = Step::callback("slow", |_: &tern_flows::Inputs| {
        std::thread::sleep(Duration::from_millis(200));
        Err(tern_flows::Error::InvalidOption {
            reason: "never arrives in time".into(),
        })
    })
    .build()?;
    let fan = FanOut::builder("fan", deadline)
        .step(Step::session("fp32", big.clone()).build()?)
        .step(slow)
        .build()?;
    let mut times = Vec::new();
    let mut partial = 0;
    for sample in samples.iter().cycle().take(100) {
        let t = Instant::now();
        let a = fan.run(sample)?;
        times.push(t.elapsed());
        partial += a.partial as usize;
    }
    println!("## Fan-out: fp32 and a 200 ms step under a 30 ms deadline (100 requests)\n");
    println!("| p50 ms | p99 ms | max ms | partial answers |\n|---|---|---|---|");
    let max = times.iter().max().copied().unwrap_or_default();
    println!(
        "| {:.2} | {:.2} | {:.2} | {} % |\n",
        pct_ms(&mut times, 0.5),
        pct_ms(&mut times, 0.99),
        max.as_secs_f64() * 1e3,
        partial
    );

    // The cache: a hit against the run it saves.
    let cache = ResultCache::new(CacheOptions::default())?;
    let cached = Step::session("fp32", big).cache(&cache).build()?;
    let sample: &Sample = &samples[0];
    let (mut miss, mut hit) = (Vec::new(), Vec::new());
    for s in samples.iter().take(50) {
        let t = Instant::now();
        cached.run_until(s, None)?;
        miss.push(t.elapsed());
    }
    for _ in 0..1000 {
        let t = Instant::now();
        let a = cached.run_until(sample, None)?;
        hit.push(t.elapsed());
        assert_eq!(a.source, Source::Cache);
    }
    println!("## Result cache (ppocr_cls fp32, 1×3×48×192 input)\n");
    println!("| | mean ms | p99 ms |\n|---|---|---|");
    println!(
        "| miss (runs the model) | {:.3} | {:.3} |",
        mean_ms(&miss),
        pct_ms(&mut miss, 0.99)
    );
    println!(
        "| hit | {:.4} | {:.4} |",
        mean_ms(&hit),
        pct_ms(&mut hit, 0.99)
    );
    Ok(())
}

fn mean_ms(d: &[Duration]) -> f64 {
    d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / d.len().max(1) as f64
}

fn pct_ms(d: &mut [Duration], q: f64) -> f64 {
    d.sort();
    let i = ((d.len() as f64 * q).ceil() as usize).clamp(1, d.len().max(1)) - 1;
    d.get(i).map_or(0.0, |x| x.as_secs_f64() * 1e3)
}
