//! A GGUF file's header: its metadata and the index of its tensors (name, type, shape, offset).
//!
//! Read here rather than by candle's `gguf_file::Content::read`, which refuses a whole file
//! when any tensor has a type candle lacks: gpt-oss files hold MXFP4 experts (ggml type 39).
//! Metadata values stay candle's `Value`, so everything that reads them is unchanged. Hostile
//! headers are bounded as candle bounds them: no count or length is trusted beyond the bytes
//! the file has left, and arrays nest at most a few levels.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufReader, Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::Shape;

/// Where tensor data starts when `general.alignment` does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays in a metadata value.
const MAX_DEPTH: usize = 4;
/// Most dimensions a tensor has.
const MAX_DIMS: u32 = 4;

/// The type of a tensor's stored values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorType {
    /// A type candle's quantized tensors hold.
    Ggml(GgmlDType),
    /// MXFP4 (ggml type 39): blocks of 32 E2M1 values with one E8M0 scale, 17 bytes each.
    Mxfp4,
}

impl TensorType {
    fn from_id(id: u32) -> Option<Self> {
        Some(Self::Ggml(match id {
            0 => GgmlDType::F32,
            1 => GgmlDType::F16,
            2 => GgmlDType::Q4_0,
            3 => GgmlDType::Q4_1,
            6 => GgmlDType::Q5_0,
            7 => GgmlDType::Q5_1,
            8 => GgmlDType::Q8_0,
            9 => GgmlDType::Q8_1,
            10 => GgmlDType::Q2K,
            11 => GgmlDType::Q3K,
            12 => GgmlDType::Q4K,
            13 => GgmlDType::Q5K,
            14 => GgmlDType::Q6K,
            15 => GgmlDType::Q8K,
            30 => GgmlDType::BF16,
            39 => return Some(Self::Mxfp4),
            _ => return None,
        }))
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::Ggml(d) => d.block_size(),
            Self::Mxfp4 => 32,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::Ggml(d) => d.type_size(),
            Self::Mxfp4 => 17,
        }
    }

    /// Bytes of `elements` values (whole blocks).
    pub fn bytes(self, elements: usize) -> usize {
        elements / self.block_size() * self.type_size()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ggml(d) => write!(f, "{d:?}"),
            Self::Mxfp4 => f.write_str("MXFP4"),
        }
    }
}

/// One tensor of the index.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Its stored type.
    pub kind: TensorType,
    /// Its shape, outermost dimension first (as candle and Hugging Face order them).
    pub shape: Shape,
    /// Where its data starts, from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of its data.
    pub fn bytes(&self) -> usize {
        self.kind.bytes(self.shape.elem_count())
    }
}

/// Metadata and tensor index of a GGUF file (version 2 or 3).
#[derive(Debug)]
pub struct GgufHeader {
    /// Every metadata key and value.
    pub metadata: HashMap<String, Value>,
    /// Every tensor by name.
    pub tensors: HashMap<String, TensorInfo>,
    /// Where the data section starts in the file.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Reads the header of the file `reader` is at the start of (Ollama's own layouts come back
    /// in llama.cpp's, see `ollama_layout`); the error says what is wrong.
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self, String> {
        let file_size = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        reader.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        let mut r = Reader {
            inner: BufReader::new(reader),
            pos: 0,
            file_size,
        };
        if &r.bytes(4)? != b"GGUF" {
            return Err("no GGUF magic".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} (versions 2 and 3 are read)"));
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        // A key-value pair takes at least 13 bytes, a tensor entry at least 24.
        if kv_count
            .saturating_mul(13)
            .saturating_add(tensor_count.saturating_mul(24))
            > r.left()
        {
            return Err(format!(
                "the header declares {kv_count} metadata entries and {tensor_count} tensors, more than the file holds"
            ));
        }
        let mut metadata = HashMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0).map_err(|e| format!("metadata `{key}`: {e}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let dims = r.u32()?;
            if dims > MAX_DIMS {
                return Err(format!("tensor `{name}` has {dims} dimensions"));
            }
            let mut shape = (0..dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let id = r.u32()?;
            let kind = TensorType::from_id(id).ok_or_else(|| format!("tensor `{name}` has unknown ggml type {id}"))?;
            let offset = r.u64()?;
            let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if elements.is_none_or(|n| !n.is_multiple_of(kind.block_size())) {
                return Err(format!("tensor `{name}` has shape {shape:?}, not whole {kind} blocks"));
            }
            tensors.insert(
                name,
                TensorInfo {
                    kind,
                    shape: Shape::from(shape),
                    offset,
                },
            );
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U32(v)) if *v > 0 => u64::from(*v),
            Some(Value::U64(v)) if *v > 0 => *v,
            _ => DEFAULT_ALIGNMENT,
        };
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        if super::ollama_layout::to_llama_cpp_layout(&mut metadata, &mut tensors, |t| &t.shape) {
            tracing::debug!("an Ollama-layout gpt-oss GGUF (architecture `gptoss`): read in llama.cpp's layout");
        }
        Ok(Self {
            metadata,
            tensors,
            data_offset,
        })
    }
}

/// Little-endian reads that count their position and refuse lengths past the file's end.
struct Reader<R: Read> {
    inner: BufReader<R>,
    pos: u64,
    file_size: u64,
}

impl<R: Read> Reader<R> {
    fn left(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        if n > self.left() {
            return Err(format!(
                "a length of {n} bytes at offset {} passes the end of the file",
                self.pos
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        if N as u64 > self.left() {
            return Err("the header is cut off".into());
        }
        self.inner.read_exact(&mut buf).map_err(|e| e.to_string())?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        String::from_utf8(self.bytes(len)?).map_err(|_| "a string is not UTF-8".to_string())
    }

    /// A value of GGUF value type `kind`.
    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(u8::from_le_bytes(self.array()?) != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err("arrays nest too deep".into());
                }
                let element = self.u32()?;
                let len = self.u64()?;
                // Every element takes at least a byte.
                if len > self.left() {
                    return Err(format!("an array of {len} elements passes the end of the file"));
                }
                Value::Array(
                    (0..len)
                        .map(|_| self.value(element, depth + 1))
                        .collect::<Result<_, _>>()?,
                )
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file written by candle's writer reads back the same.
    #[test]
    fn reads_what_candle_writes() {
        use candle_core::quantized::{gguf_file, QTensor};
        use candle_core::{Device, Tensor};
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let meta = [
            ("general.architecture", Value::String("llama".into())),
            ("a.list", Value::Array(vec![Value::U32(3), Value::U32(4)])),
            ("a.flag", Value::Bool(true)),
        ];
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &meta, &[("w", &q)]).unwrap();
        let header = GgufHeader::read(&mut bytes).expect("reads");
        assert_eq!(header.metadata["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(header.metadata["a.list"].to_vec().unwrap().len(), 2);
        assert!(header.metadata["a.flag"].to_bool().unwrap());
        let w = &header.tensors["w"];
        assert_eq!(
            (w.kind, w.shape.dims()),
            (TensorType::Ggml(GgmlDType::Q8_0), &[2usize, 32][..])
        );
        assert_eq!(w.bytes(), 2 * 34);
        bytes.set_position(0);
        let candle = gguf_file::Content::read(&mut bytes).unwrap();
        assert_eq!(header.data_offset, candle.tensor_data_offset);
        assert_eq!(w.offset, candle.tensor_infos["w"].offset);
    }

    /// Cut-off headers and lengths past the end are errors, not allocations.
    #[test]
    fn hostile_headers_are_errors() {
        let mut head = b"GGUF".to_vec();
        head.extend(3u32.to_le_bytes());
        head.extend(0u64.to_le_bytes());
        head.extend(1u64.to_le_bytes());
        let mut huge_key = head.clone();
        huge_key.extend(u64::MAX.to_le_bytes());
        huge_key.extend([0u8; 64]);
        let err = GgufHeader::read(&mut std::io::Cursor::new(huge_key)).unwrap_err();
        assert!(err.contains("passes the end"), "{err}");
        let mut counts = b"GGUF".to_vec();
        counts.extend(3u32.to_le_bytes());
        counts.extend(u64::MAX.to_le_bytes());
        counts.extend(0u64.to_le_bytes());
        let err = GgufHeader::read(&mut std::io::Cursor::new(counts)).unwrap_err();
        assert!(err.contains("more than the file holds"), "{err}");
        let err = GgufHeader::read(&mut std::io::Cursor::new(b"GGUF".to_vec())).unwrap_err();
        assert!(err.contains("cut off"), "{err}");
    }
}
