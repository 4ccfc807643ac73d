pub mod bench;
pub mod data;
pub mod eval_preds;
pub mod generate;
pub mod stub;
pub mod train;
