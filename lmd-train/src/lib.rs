pub use lmd_data as data;
pub use lmd_model as model;
