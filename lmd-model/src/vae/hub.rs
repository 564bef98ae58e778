//! Where VAE weights come from: a local directory, or (for users with internet) a Hugging Face
//! hub repository through the `hf-hub` crate, downloaded once into its cache
//! (`$HF_HOME`, `$HF_ENDPOINT` are honoured).
//!
//! `--vae-weights` forms: an existing directory, or `hf:OWNER/REPO[/SUBFOLDER]`. Without
//! `--vae-weights`, programs use the VAE's default repository: `taesd` -> `hf:madebyollin/taesd`,
//! `sd-vae` -> `hf:stabilityai/sd-vae-ft-mse`.

use super::VaeKind;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The files a VAE needs from its weights directory.
pub fn required_files(vae: VaeKind) -> &'static [&'static str] {
    match vae {
        VaeKind::Taesd => &["taesd_encoder.safetensors", "taesd_decoder.safetensors"],
        VaeKind::SdVae => &["config.json", "diffusion_pytorch_model.safetensors"],
    }
}

/// The default hub repository of a VAE.
pub fn default_repo(vae: VaeKind) -> &'static str {
    match vae {
        VaeKind::Taesd => "madebyollin/taesd",
        VaeKind::SdVae => "stabilityai/sd-vae-ft-mse",
    }
}

/// Split a hub spec `hf:OWNER/REPO[/SUBFOLDER]` into (repo id, subfolder), or `None`.
pub fn parse_hub_spec(spec: &str) -> Option<(String, Option<String>)> {
    let s = spec.strip_prefix("hf:")?;
    let parts: Vec<&str> = s.split('/').collect();
    let valid = |p: &str| {
        !p.is_empty()
            && p != ".."
            && p != "."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() < 2 || !parts.iter().all(|p| valid(p)) {
        return None;
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let sub = (parts.len() > 2).then(|| parts[2..].join("/"));
    Some((repo, sub))
}

/// Resolve `spec` to a local directory holding `vae`'s files, downloading from the hub when
/// `spec` names a repository rather than an existing directory.
pub fn resolve_weights(vae: VaeKind, spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let Some((repo, sub)) = parse_hub_spec(spec) else {
        return Err(Error::Weights {
            path: p.to_path_buf(),
            detail: format!(
                "no such directory (nor a hub repository hf:OWNER/REPO); {vae} needs {} in it",
                required_files(vae).join(" + ")
            ),
        });
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_err(&repo, "", e.to_string()))?;
    let r = api.model(repo.clone());
    let mut dir = None;
    for f in required_files(vae) {
        let name = match &sub {
            Some(s) => format!("{s}/{f}"),
            None => f.to_string(),
        };
        let local = r
            .get(&name)
            .map_err(|e| hub_err(&repo, &name, e.to_string()))?;
        dir = local.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| hub_err(&repo, "", "no files".into()))
}

fn hub_err(repo: &str, file: &str, e: String) -> Error {
    Error::Weights {
        path: PathBuf::from(format!("hf:{repo}/{file}")),
        detail: format!(
            "cannot download from the Hugging Face hub ({e}); without internet, download the files \
             elsewhere and pass their directory as --vae-weights DIR"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_specs() {
        assert_eq!(
            parse_hub_spec("hf:madebyollin/taesd"),
            Some(("madebyollin/taesd".into(), None))
        );
        assert_eq!(parse_hub_spec("madebyollin/taesd"), None);
        assert_eq!(
            parse_hub_spec("hf:stabilityai/stable-diffusion-2-1/vae"),
            Some((
                "stabilityai/stable-diffusion-2-1".into(),
                Some("vae".into())
            ))
        );
        assert_eq!(parse_hub_spec("weights"), None);
        assert_eq!(parse_hub_spec("hf:../x/y"), None);
        assert_eq!(parse_hub_spec("/abs/path"), None);
    }

    #[test]
    fn unreachable_hub_is_a_clear_error() {
        // A closed port on loopback stands in for "no internet".
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", dir.path());
        let e = resolve_weights(VaeKind::Taesd, "hf:madebyollin/taesd")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("madebyollin/taesd") && e.contains("--vae-weights DIR"),
            "{e}"
        );
        let e = resolve_weights(VaeKind::Taesd, "no-such-dir")
            .unwrap_err()
            .to_string();
        assert!(e.contains("taesd_encoder.safetensors"), "{e}");
    }
}
