//! What a checkpoint records of the model that wrote it, so that a program given only the
//! weights (`lmd-finetune --pretrained`, `lmd-export`) knows their architecture, and a shape
//! given that differs is refused by name before any data is read.
//!
//! Rules:
//! - Looked for, in order: `classifier.json` beside the weights (`lmd-finetune`'s `best/` and
//!   checkpoints), then a run's `config.json` in the weights' folder or up to three above it
//!   (`lmd-train`'s `OUT/checkpoints/step-N/model.safetensors`).
//! - From a `config.json` only `preset`, `model` and `input` are read (an `lmd-train` and an
//!   `lmd-finetune` run both write them; one without `preset` is not a run's and is passed
//!   over); the architecture is what the run built from them.
//! - Weights outside a run (an official MAE `.pth`, a converted file) record nothing: the
//!   caller takes its own settings, and a mismatch shows when the tensors load.

use crate::train_data::Input;
use lmd_model::{ClassifierConfig, MaeConfig, Preset};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A checkpoint's architecture and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedModel {
    /// The file it was read from (`classifier.json` or `config.json`).
    pub from: PathBuf,
    /// The model (for `classifier.json`, its encoder; decoder fields then are defaults).
    pub model: MaeConfig,
    /// What the run read (a `classifier.json` does not say).
    pub input: Option<Input>,
}

/// The keys of a run's `config.json` that fix its model.
#[derive(Deserialize)]
struct ModelKeys {
    /// Required: a `config.json` without it (a diffusers or Hugging Face one) is not a run's.
    preset: Preset,
    #[serde(default)]
    model: Option<MaeConfig>,
    #[serde(default)]
    input: Input,
}

/// The architecture recorded beside the weights file `weights` (see the module rules), or
/// None where nothing is recorded. An unreadable record is skipped, as if absent.
pub fn recorded_model(weights: &Path) -> Option<RecordedModel> {
    let dir = weights.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let beside = dir.join("classifier.json");
    if let Some(c) = std::fs::read_to_string(&beside)
        .ok()
        .and_then(|s| serde_json::from_str::<ClassifierConfig>(&s).ok())
    {
        return Some(RecordedModel {
            from: beside,
            model: c.encoder,
            input: None,
        });
    }
    dir.ancestors().take(4).find_map(|d| {
        let from = d.join("config.json");
        let k: ModelKeys = serde_json::from_str(&std::fs::read_to_string(&from).ok()?).ok()?;
        let model = crate::train::resolve_model(k.preset, k.model.as_ref(), k.input).ok()?;
        Some(RecordedModel {
            from,
            model,
            input: Some(k.input),
        })
    })
}

/// The encoder's shape in words (`192 wide, depth 12, 3 heads, mlp 4, patch 2 on 4x28x28`):
/// two encoders with the same words take the same weights.
pub fn encoder_shape(m: &MaeConfig) -> String {
    format!(
        "{} wide, depth {}, {} heads, mlp {}, patch {} on {}x{}x{}",
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.mlp_ratio,
        m.patch_size,
        m.in_chans,
        m.img_size[0],
        m.img_size[1]
    )
}

/// What a refusal tells the user to do when the encoder differs from the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// The program takes the recorded architecture when given none (`lmd-finetune
    /// --pretrained`): leave out the preset and model.
    TakeRecorded,
    /// The program builds what its flags and config say (`lmd-train --init`): give the
    /// recorded ones.
    GiveSame,
}

/// Refuse an encoder `enc` (on `input`) that is not the one the weights `weights` record,
/// naming both shapes and what to pass instead. Weights that record nothing pass.
pub fn check_encoder(
    weights: &Path,
    enc: &MaeConfig,
    input: Input,
    remedy: Remedy,
) -> crate::Result<()> {
    recorded_model(weights).map_or(Ok(()), |r| r.check(weights, enc, input, remedy))
}

impl RecordedModel {
    /// Refuse an encoder `enc` (on `input`) that is not this one, naming both shapes, the
    /// weights file and what to pass instead.
    pub fn check(
        &self,
        weights: &Path,
        enc: &MaeConfig,
        input: Input,
        remedy: Remedy,
    ) -> crate::Result<()> {
        let (theirs, ours) = (encoder_shape(&self.model), encoder_shape(enc));
        let their_input = self.input.unwrap_or(input);
        if theirs == ours && their_input == input {
            return Ok(());
        }
        let fix = match (theirs == ours, remedy) {
            // the same shape on other data: only the input differs
            (true, _) => format!("give --input {their_input}"),
            (false, Remedy::TakeRecorded) => {
                "leave out --preset and the config's preset/model to take the checkpoint's, \
                 or give the same ones"
                    .to_string()
            }
            (false, Remedy::GiveSame) => format!(
                "give the --preset and [model] that {} records, or weights of this run's shape",
                self.from.display()
            ),
        };
        Err(crate::Error::Invalid(format!(
            "{}: its encoder ({theirs}, on {their_input}; from {}) is not this run's ({ours}, \
             on {input}): {fix}",
            weights.display(),
            self.from.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal `check_encoder` gives (it must refuse).
    fn refusal(w: &Path, enc: &MaeConfig, input: Input, remedy: Remedy) -> String {
        check_encoder(w, enc, input, remedy)
            .unwrap_err()
            .to_string()
    }

    fn write(p: &Path, v: serde_json::Value) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v.to_string()).unwrap();
    }

    #[test]
    fn a_run_records_its_model_in_config_json_and_a_classifier_beside_its_weights() {
        let t = tempfile::tempdir().unwrap();
        // an lmd-train run: OUT/config.json, weights two folders down
        let w = t
            .path()
            .join("run/checkpoints/step-00000010/model.safetensors");
        write(
            &t.path().join("run/config.json"),
            serde_json::json!({"preset": "base_patch4", "input": "latents", "steps": 3,
                               "world_size": 1}),
        );
        let r = recorded_model(&w).unwrap();
        assert_eq!(r.model, Preset::BasePatch4.config());
        assert_eq!(r.input, Some(Input::Latents));
        assert_eq!(r.from, t.path().join("run/config.json"));
        check_encoder(
            &w,
            &Preset::BasePatch4.config(),
            Input::Latents,
            Remedy::TakeRecorded,
        )
        .unwrap();
        let e = refusal(
            &w,
            &Preset::Tiny.config(),
            Input::Latents,
            Remedy::TakeRecorded,
        );
        assert!(
            e.contains("768 wide, depth 12, 12 heads, mlp 4, patch 4 on 4x28x28")
                && e.contains("192 wide")
                && e.contains("step-00000010")
                && e.contains("--preset"),
            "{e}"
        );
        // lmd-train --init builds what it is told: the fix is to give the recorded preset
        let e = refusal(&w, &Preset::Tiny.config(), Input::Latents, Remedy::GiveSame);
        assert!(
            e.contains("give the --preset and [model] that")
                && e.contains("run/config.json")
                && !e.contains("leave out"),
            "{e}"
        );
        // the same shape on pixels is another model
        let px = crate::train::resolve_model(Preset::BasePatch4, None, Input::Pixels).unwrap();
        assert!(check_encoder(&w, &px, Input::Pixels, Remedy::TakeRecorded).is_err());
        // the same encoder read from other data: only --input is wrong, and the message says so
        let e = refusal(
            &w,
            &Preset::BasePatch4.config(),
            Input::Pixels,
            Remedy::TakeRecorded,
        );
        assert!(e.contains("give --input latents"), "{e}");
        // a pixel run records its pixel encoder
        write(
            &t.path().join("run/config.json"),
            serde_json::json!({"preset": "tiny", "input": "pixels"}),
        );
        let r = recorded_model(&w).unwrap();
        assert_eq!((r.model.in_chans, r.model.img_size), (3, [224, 224]));
        // classifier.json beside the weights comes first
        let mut c = Preset::Small.config();
        c.img_size = [8, 8];
        write(
            &w.with_file_name("classifier.json"),
            serde_json::json!({"encoder": c, "num_classes": 10, "global_pool": true,
                               "drop_path": 0.1, "linear_probe": false}),
        );
        let r = recorded_model(&w).unwrap();
        assert_eq!((r.model.clone(), r.input), (c.clone(), None));
        check_encoder(&w, &c, Input::Latents, Remedy::TakeRecorded).unwrap();
        // weights outside any run record nothing and pass
        let lone = t.path().join("elsewhere/mae_pretrain_vit_base.pth");
        assert_eq!(recorded_model(&lone), None);
        check_encoder(
            &lone,
            &Preset::Tiny.config(),
            Input::Latents,
            Remedy::TakeRecorded,
        )
        .unwrap();
        // an unreadable record counts as none
        write(
            &t.path().join("bad/config.json"),
            serde_json::json!({"preset": "huge"}),
        );
        assert_eq!(
            recorded_model(&t.path().join("bad/model.safetensors")),
            None
        );
        // nor is another program's config.json (no preset) taken for a run's
        write(
            &t.path().join("hf/config.json"),
            serde_json::json!({"hidden_size": 768, "num_hidden_layers": 12}),
        );
        assert_eq!(recorded_model(&t.path().join("hf/model.safetensors")), None);
    }
}
