//! Process setup shared by the lmd programs (the programs themselves live in `src/bin/`).

// Tensor programs allocate and free large buffers at a high rate: mimalloc (told by
// `init_allocator` to keep freed memory) reuses them instead of returning them to the OS and
// faulting fresh zeroed pages in on every op. Every lmd program links this crate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (position in `mi_option_e`, mimalloc v3 `mimalloc.h`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory in the process: tensor programs free and reallocate the same large
/// buffers every step, and returning them to the OS costs a zero-filled page fault per 4 KiB
/// on the next use (a third of a CPU training step before this). Call first thing in `main`.
pub fn init_allocator() {
    // SAFETY: sets a global mimalloc option; thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// The settings a program starts from: `Default`, or the TOML file given with `--config`
/// (errors name the file).
pub fn load_config<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> anyhow::Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    toml::from_str::<T>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_option_is_the_one_we_set() {
        super::init_allocator();
        // SAFETY: reads a global option.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, -1);
    }
}
