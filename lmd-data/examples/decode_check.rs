//! Decode + transform every image of an input and print the failures (a debugging aid):
//! `cargo run --release -p lmd-data --example decode_check -- INPUT`.
use lmd_data::source::{InputSpec, Labels, SourceEvent};
fn main() {
    let input = std::env::args().nth(1).expect("usage: decode_check INPUT");
    let spec = InputSpec::detect(&input, None, None).unwrap();
    let cfg = lmd_data::transform::TransformConfig::default();
    let mut r = lmd_data::transform::Resizer::new();
    spec.read(Labels::Optional, &mut |ev| {
        if let SourceEvent::Sample(s) = ev {
            let res = lmd_data::decode::decode_rgb8(&s.image, u64::MAX)
                .map_err(|e| e.to_string())
                .and_then(|img| {
                    let d = (img.width, img.height);
                    lmd_data::transform::prepare(&img, &s.key, &cfg, &mut r)
                        .map_err(|e| format!("{e} {d:?}"))
                });
            if let Err(e) = res {
                println!("{} {}", s.key, e);
            }
        }
        true
    })
    .unwrap();
}
