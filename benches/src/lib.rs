//! Benchmark harnesses of pagestream: synthetic memory images, the baselines every figure is
//! compared against, and the runners behind `pagestream bench` and `pagestream codec bench`.
//! Criterion micro-benchmarks live beside the code they measure (`pagecodec/benches/`).

pub mod baseline;
pub mod codec_bench;
pub mod delay_line;
pub mod imagegen;
pub mod machine;
pub mod netns;
pub mod qemu_bench;
pub mod shim_bench;
pub mod transport_bench;
