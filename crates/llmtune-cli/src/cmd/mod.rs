pub mod api;
pub mod bench;
pub mod chat;
pub mod data;
pub mod eval_preds;
pub mod export;
pub mod generate;
pub mod train;
