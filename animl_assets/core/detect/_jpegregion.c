/* Decode only the part of a JPEG that a crop needs, with the pixels a full decode gives.
 *
 * libjpeg-turbo's own partial-decoding API: jpeg_crop_scanline() narrows the decoded columns to
 * whole iMCU columns, jpeg_skip_scanlines() skips the IDCT, upsampling and colour conversion of
 * the rows above, and decoding stops after the last row needed (the rows below are not even
 * entropy-decoded). Same library, same IDCT (ISLOW) and same fancy upsampling as Pillow's
 * decoder, so the pixels are the same; the caller widens the region by one iMCU on every side
 * so that upsampling at the region's edges sees the same neighbours as in the full image.
 *
 * Any libjpeg warning (corrupt data, premature end) is an error here: the caller then falls
 * back to a full decode, which reports the image as it always did.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>
#include <jerror.h>

#ifndef LIBJPEG_TURBO_VERSION
#error "needs libjpeg-turbo (1.5 or later) for jpeg_crop_scanline and jpeg_skip_scanlines"
#endif
#if JPEG_LIB_VERSION >= 70 /* libjpeg v7/v8 API (e.g. Ubuntu's libjpeg-turbo8) */
#define DCT_H_SIZE(cinfo) ((cinfo).min_DCT_h_scaled_size)
#define DCT_V_SIZE(cinfo) ((cinfo).min_DCT_v_scaled_size)
#else
#define DCT_H_SIZE(cinfo) ((cinfo).min_DCT_scaled_size)
#define DCT_V_SIZE(cinfo) ((cinfo).min_DCT_scaled_size)
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} strict_error_mgr;

static void strict_error_exit(j_common_ptr cinfo)
{
    strict_error_mgr *err = (strict_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void strict_emit_message(j_common_ptr cinfo, int level)
{
    if (level < 0) /* a warning: corrupt or truncated data */
        strict_error_exit(cinfo);
}

PyDoc_STRVAR(decode_region_doc,
"decode_region(data, left, top, right, bottom, scale=1) -> (pixels, x0, y0, width, height)\n\n"
"Decode a region of a JPEG that holds the columns left..right-1 and the rows top..bottom-1, as\n"
"RGB bytes (height rows of width * 3) whose top-left pixel is (x0, y0) of the image. The region\n"
"has one iMCU of margin left, right and above (clipped to the image) and starts on iMCU\n"
"boundaries. With scale 2, 4 or 8 the image is decoded DCT-scaled to 1/scale and every\n"
"coordinate is in the scaled image. Raises ValueError for colour spaces other than YCbCr, RGB\n"
"and grayscale, for a region outside the image, and for any corrupt data.");

static PyObject *decode_region(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer data;
    unsigned int left, top, right, bottom, scale = 1;
    if (!PyArg_ParseTuple(args, "y*IIII|I", &data, &left, &top, &right, &bottom, &scale))
        return NULL;

    struct jpeg_decompress_struct cinfo;
    strict_error_mgr err;
    PyObject *volatile pixels = NULL;
    JDIMENSION x0 = 0, y0 = 0, width = 0;
    const char *refusal = NULL;
    PyThreadState *volatile thread = PyEval_SaveThread();

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = strict_error_exit;
    err.pub.emit_message = strict_emit_message;
    err.message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        if (thread)
            PyEval_RestoreThread(thread);
        Py_XDECREF(pixels);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", err.message);
        return NULL;
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.scale_num = 1;
    cinfo.scale_denom = scale;
    cinfo.out_color_space = JCS_RGB;
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_RGB &&
        cinfo.jpeg_color_space != JCS_GRAYSCALE)
        refusal = "only YCbCr, RGB and grayscale JPEGs are decoded by region";
    else if (scale != 1 && scale != 2 && scale != 4 && scale != 8)
        refusal = "scale must be 1, 2, 4 or 8";
    else {
        jpeg_calc_output_dimensions(&cinfo);
        if (left >= right || top >= bottom || right > cinfo.output_width || bottom > cinfo.output_height)
            refusal = "the region is empty or reaches past the image";
    }
    if (refusal) {
        jpeg_destroy_decompress(&cinfo);
        PyEval_RestoreThread(thread);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, refusal);
        return NULL;
    }
    jpeg_start_decompress(&cinfo);
    /* one iMCU of margin left, right and above, the region's top on an iMCU row */
    const unsigned int imcu_w = cinfo.max_h_samp_factor * DCT_H_SIZE(cinfo);
    const unsigned int imcu_h = cinfo.max_v_samp_factor * DCT_V_SIZE(cinfo);
    x0 = left > imcu_w ? left - imcu_w : 0;
    width = (right + imcu_w < cinfo.output_width ? right + imcu_w : cinfo.output_width) - x0;
    y0 = top > imcu_h ? (top - imcu_h) / imcu_h * imcu_h : 0;
    if (x0 > 0 || width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x0, &width);
    if (y0 > 0 && jpeg_skip_scanlines(&cinfo, y0) != y0)
        ERREXIT(&cinfo, JERR_TOO_LITTLE_DATA);

    PyEval_RestoreThread(thread);
    thread = NULL;
    pixels = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)width * 3 * (bottom - y0));
    if (pixels == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    thread = PyEval_SaveThread();
    JSAMPLE *out = (JSAMPLE *)PyBytes_AS_STRING(pixels);
    while (cinfo.output_scanline < bottom) {
        JSAMPROW row = out + (size_t)(cinfo.output_scanline - y0) * width * 3;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(thread);
    PyBuffer_Release(&data);
    return Py_BuildValue("(NIIII)", pixels, x0, y0, width, bottom - y0);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS, decode_region_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegregion",
    "Partial JPEG decoding with libjpeg-turbo: only the rows and iMCU columns a crop needs.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpegregion(void)
{
    return PyModule_Create(&module);
}
