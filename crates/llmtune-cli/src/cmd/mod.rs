pub mod generate;
pub mod stub;
pub mod train;
