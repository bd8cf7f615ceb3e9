// trt_step: run one step of a TensorRT engine on inputs stored as .npy files.
//
//   trt_step ENGINE INPUT_DIR OUTPUT_DIR
//
// Reads every engine input from INPUT_DIR/<input_name>.npy (little-endian, C order; float32,
// float16, int64, int32 or int8, matching the engine's tensor dtype exactly), sets the input
// shapes, runs enqueueV3 once and writes every output to OUTPUT_DIR/<output_name>.npy.
// Runtime sequence from reference/tensorrt.md §1.9: createInferRuntime -> deserializeCudaEngine
// -> createExecutionContext -> setInputShape / setTensorAddress -> enqueueV3.
//
// Built with -DTRT_STEP_NPY_ONLY the file is a TensorRT-free .npy round-trip tool
// (`npy_roundtrip IN.npy OUT.npy`), so the .npy code can be tested without TensorRT or CUDA.

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

struct Array {
    std::string descr;            // numpy dtype string, e.g. "<f4", "<i8", "|i1"
    std::vector<int64_t> shape;   // empty for a 0-d array
    std::vector<char> data;       // C-order bytes
};

inline size_t itemsize(const std::string& descr) {
    if (descr == "<f4" || descr == "<i4") return 4;
    if (descr == "<i8") return 8;
    if (descr == "<f2") return 2;
    if (descr == "|i1" || descr == "<i1") return 1;
    throw std::runtime_error("unsupported .npy dtype '" + descr +
                             "' (supported: <f4 float32, <f2 float16, <i8 int64, <i4 int32, |i1 int8)");
}

inline int64_t numel(const std::vector<int64_t>& shape) {
    return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

// The quoted value after 'key': in the header dict, or the raw text up to the next ',' / ')'.
inline std::string dict_value(const std::string& header, const std::string& key) {
    size_t k = header.find("'" + key + "'");
    if (k == std::string::npos) throw std::runtime_error(".npy header has no '" + key + "'");
    size_t colon = header.find(':', k);
    size_t start = header.find_first_not_of(' ', colon + 1);
    if (header[start] == '\'') return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
    if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
    return header.substr(start, header.find_first_of(",}", start) - start);
}

inline std::vector<int64_t> parse_shape(const std::string& tuple) {  // "(2, 8, 32)", "(5,)", "()"
    std::vector<int64_t> shape;
    std::string inner = tuple.substr(1, tuple.size() - 2);
    std::stringstream ss(inner);
    std::string item;
    while (std::getline(ss, item, ',')) {
        if (item.find_first_not_of(' ') == std::string::npos) continue;
        shape.push_back(std::stoll(item));
    }
    return shape;
}

inline Array read(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path);
    char magic[8];
    if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
        throw std::runtime_error(path + ": not a .npy file");
    uint8_t major = static_cast<uint8_t>(magic[6]);
    uint32_t hlen = 0;
    unsigned char len_bytes[4] = {0, 0, 0, 0};
    int nlen = major == 1 ? 2 : 4;  // v1: uint16 header length; v2/v3: uint32 (little-endian)
    if (!f.read(reinterpret_cast<char*>(len_bytes), nlen)) throw std::runtime_error(path + ": truncated header");
    for (int i = nlen - 1; i >= 0; --i) hlen = (hlen << 8) | len_bytes[i];
    std::string header(hlen, '\0');
    if (!f.read(&header[0], hlen)) throw std::runtime_error(path + ": truncated header");
    Array a;
    a.descr = dict_value(header, "descr");
    if (dict_value(header, "fortran_order").find("True") != std::string::npos)
        throw std::runtime_error(path + ": Fortran-order arrays are not supported; save with np.ascontiguousarray");
    if (a.descr[0] == '>') throw std::runtime_error(path + ": big-endian arrays are not supported");
    a.shape = parse_shape(dict_value(header, "shape"));
    a.data.resize(static_cast<size_t>(numel(a.shape)) * itemsize(a.descr));
    if (!f.read(a.data.data(), static_cast<std::streamsize>(a.data.size())))
        throw std::runtime_error(path + ": fewer data bytes than the shape needs");
    return a;
}

inline void write(const std::string& path, const Array& a) {
    std::string shape = "(";
    for (size_t i = 0; i < a.shape.size(); ++i) shape += std::to_string(a.shape[i]) + (a.shape.size() == 1 ? "," : (i + 1 < a.shape.size() ? ", " : ""));
    shape += ")";
    std::string header = "{'descr': '" + a.descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
    size_t total = 10 + header.size() + 1;               // magic(6)+version(2)+len(2) + header + '\n'
    header.append((64 - total % 64) % 64, ' ');          // pad to a multiple of 64, as numpy does
    header += '\n';
    std::ofstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot write " + path);
    const char pre[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    uint16_t hlen = static_cast<uint16_t>(header.size());
    const char len_le[2] = {static_cast<char>(hlen & 0xff), static_cast<char>(hlen >> 8)};
    f.write(pre, 8);
    f.write(len_le, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(a.data.data(), static_cast<std::streamsize>(a.data.size()));
    if (!f) throw std::runtime_error("error writing " + path);
}

}  // namespace npy

#ifdef TRT_STEP_NPY_ONLY

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: npy_roundtrip IN.npy OUT.npy\n";
        return 2;
    }
    try {
        npy::Array a = npy::read(argv[1]);
        std::cout << a.descr << " [";
        for (size_t i = 0; i < a.shape.size(); ++i) std::cout << (i ? "," : "") << a.shape[i];
        std::cout << "]\n";
        npy::write(argv[2], a);
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}

#else  // the TensorRT runner

#include <NvInfer.h>
#include <cuda_runtime_api.h>

namespace {

class Logger : public nvinfer1::ILogger {
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
    }
};

void check_cuda(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) throw std::runtime_error(what + ": " + cudaGetErrorString(err));
}

std::string descr_of(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: return "<f4";
        case nvinfer1::DataType::kHALF: return "<f2";
        case nvinfer1::DataType::kINT64: return "<i8";
        case nvinfer1::DataType::kINT32: return "<i4";
        case nvinfer1::DataType::kINT8: return "|i1";
        default: throw std::runtime_error("engine tensor dtype has no .npy mapping in trt_step");
    }
}

std::vector<char> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) throw std::runtime_error("cannot open " + path);
    std::vector<char> blob(static_cast<size_t>(f.tellg()));
    f.seekg(0);
    f.read(blob.data(), static_cast<std::streamsize>(blob.size()));
    return blob;
}

struct DeviceBuffer {
    void* ptr = nullptr;
    ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
};

int run(const std::string& engine_path, const std::string& in_dir, const std::string& out_dir) {
    Logger logger;
    std::vector<char> blob = read_file(engine_path);
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine) throw std::runtime_error("cannot deserialise " + engine_path + " (TensorRT version or GPU mismatch?)");
    std::unique_ptr<nvinfer1::IExecutionContext> ctx(engine->createExecutionContext());

    const int n = engine->getNbIOTensors();
    std::vector<DeviceBuffer> buffers(static_cast<size_t>(n));
    std::vector<std::string> outputs;
    for (int i = 0; i < n; ++i) {  // inputs first: output shapes follow from them
        const char* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) { outputs.push_back(name); continue; }
        npy::Array a = npy::read(in_dir + "/" + name + ".npy");
        std::string want = descr_of(engine->getTensorDataType(name));
        if (a.descr != want && !(want == "|i1" && a.descr == "<i1"))
            throw std::runtime_error(std::string("input ") + name + ": .npy dtype " + a.descr + ", engine wants " + want);
        nvinfer1::Dims dims{};
        dims.nbDims = static_cast<int32_t>(a.shape.size());
        for (size_t k = 0; k < a.shape.size(); ++k) dims.d[k] = a.shape[k];
        if (!ctx->setInputShape(name, dims))
            throw std::runtime_error(std::string("input ") + name + ": shape outside the engine's optimisation profile");
        check_cuda(cudaMalloc(&buffers[i].ptr, a.data.size() ? a.data.size() : 1), "cudaMalloc");
        check_cuda(cudaMemcpy(buffers[i].ptr, a.data.data(), a.data.size(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
        ctx->setTensorAddress(name, buffers[i].ptr);
    }
    std::vector<npy::Array> results;
    for (int i = 0; i < n; ++i) {
        const char* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) continue;
        nvinfer1::Dims dims = ctx->getTensorShape(name);
        npy::Array a;
        a.descr = descr_of(engine->getTensorDataType(name));
        for (int k = 0; k < dims.nbDims; ++k) {
            if (dims.d[k] < 0) throw std::runtime_error(std::string("output ") + name + " has a data-dependent shape");
            a.shape.push_back(dims.d[k]);
        }
        a.data.resize(static_cast<size_t>(npy::numel(a.shape)) * npy::itemsize(a.descr));
        check_cuda(cudaMalloc(&buffers[i].ptr, a.data.size() ? a.data.size() : 1), "cudaMalloc");
        ctx->setTensorAddress(name, buffers[i].ptr);
        results.push_back(std::move(a));
    }
    cudaStream_t stream;
    check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
    bool ok = ctx->enqueueV3(stream);
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    cudaStreamDestroy(stream);
    if (!ok) throw std::runtime_error("enqueueV3 failed");
    size_t r = 0;
    for (int i = 0; i < n; ++i) {
        const char* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) continue;
        npy::Array& a = results[r++];
        check_cuda(cudaMemcpy(a.data.data(), buffers[i].ptr, a.data.size(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
        npy::write(out_dir + "/" + name + ".npy", a);
        std::cout << name << " " << a.descr << " " << a.data.size() << " bytes\n";
    }
    ctx.reset();  // destroy context -> engine -> runtime, in that order (§1.9)
    engine.reset();
    runtime.reset();
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: trt_step ENGINE INPUT_DIR OUTPUT_DIR\n";
        return 2;
    }
    try {
        return run(argv[1], argv[2], argv[3]);
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}

#endif
