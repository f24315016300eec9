//! The cache key of a rootfs image: a hash of everything that goes into it.

use sha2::{Digest, Sha256};

/// Bump when the builder changes what it puts in an image, so old cached images are not reused.
/// v2: the stimulus is instrumented (`-fsanitize-coverage=trace-pc`) and linked with rrr's runtime.
pub const BUILDER_VERSION: &str = "rrr-rootfs image v2";

/// The inputs of one image, as bytes.
pub struct KeyInputs<'a> {
    pub stimulus_name: &'a str,
    pub stimulus_source: &'a [u8],
    pub m32: bool,
    pub extra_cflags: &'a [String],
    pub compiler: &'a str,
    pub busybox: &'a [u8],
}

/// Hex sha256 over the inputs. Every field is length-prefixed, so no two different inputs can
/// run together into the same byte stream.
pub fn cache_key(inputs: &KeyInputs) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(BUILDER_VERSION.as_bytes());
    field(inputs.stimulus_name.as_bytes());
    field(inputs.stimulus_source);
    field(&[u8::from(inputs.m32)]);
    field(&(inputs.extra_cflags.len() as u64).to_le_bytes());
    for flag in inputs.extra_cflags {
        field(flag.as_bytes());
    }
    field(inputs.compiler.as_bytes());
    for (name, text) in rrr_guest::agent::SOURCES {
        field(name.as_bytes());
        field(text.as_bytes());
    }
    field(&Sha256::digest(inputs.busybox));
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Inputs {
        name: &'static str,
        source: &'static [u8],
        m32: bool,
        flags: Vec<String>,
        compiler: &'static str,
        busybox: &'static [u8],
    }

    impl Inputs {
        fn key(&self) -> String {
            cache_key(&KeyInputs {
                stimulus_name: self.name,
                stimulus_source: self.source,
                m32: self.m32,
                extra_cflags: &self.flags,
                compiler: self.compiler,
                busybox: self.busybox,
            })
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = Inputs {
            name: "a.c",
            source: b"int main(){}",
            m32: false,
            flags: vec!["-DX".into()],
            compiler: "12.2.0",
            busybox: b"bb",
        };
        assert_eq!(base.key(), base.clone().key());
        let change = |f: &dyn Fn(&mut Inputs)| {
            let mut inputs = base.clone();
            f(&mut inputs);
            inputs.key()
        };
        let variants = [
            change(&|i| i.name = "b.c"),
            change(&|i| i.source = b"int main(){ }"),
            change(&|i| i.m32 = true),
            change(&|i| i.flags.clear()),
            change(&|i| i.flags = vec!["-D".into(), "X".into()]),
            change(&|i| i.compiler = "13.1.0"),
            change(&|i| i.busybox = b"bb2"),
        ];
        for variant in &variants {
            assert_ne!(&base.key(), variant);
        }
    }
}
